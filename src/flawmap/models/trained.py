"""What every method that trains a network shares: the training hyper-parameters, the losses of
every fit, and the one call of the shared training loop (:func:`flawmap.training.train`).

A trained method subclasses :class:`TrainedModel`, sets its own defaults for the shared
hyper-parameters where they differ, and calls :meth:`TrainedModel._train` from ``_learn`` with
its network, its cached training data and its loss. ``partial_fit`` then continues training the
network on the new images (``epochs`` more epochs, fresh optimiser), and ``checkpoint_dir``
resumes an interrupted fit exactly.

``float32_training`` makes a fit run in float32 from end to end (features, cached training data,
training and the calibration scores), whatever the runtime's precision: how the papers' official
code trains. Without it a fit follows the runtime (bfloat16 autocast where the hardware is fast
at it) and caches its training data in float16, half the memory. Either way the runtime's
precision applies again after the fit, to prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from flawmap.errors import FlawmapError
from flawmap.models.base import AnomalyModel, MethodTraits
from flawmap.prediction import ImageInput
from flawmap.training import Batch, cache_batches, fit_checkpoint, train


def check_training_params(epochs: int, batch_size: int, learning_rate: float, weight_decay: float = 0.0) -> None:
    """FlawmapError unless epochs and batch size are at least 1, the learning rate positive and the
    weight decay non-negative (shared by every method that trains)."""
    if epochs < 1 or batch_size < 1:
        raise FlawmapError(f"epochs and train_batch_size must be at least 1, got {epochs} and {batch_size}")
    if not learning_rate > 0.0 or not weight_decay >= 0.0:
        raise FlawmapError(f"need learning_rate > 0 and weight_decay >= 0, got {learning_rate} and {weight_decay}")


@dataclass(kw_only=True, eq=False)
class TrainedModel(AnomalyModel):
    """Base of the methods that train a network (see module docstring). Shared hyper-parameters:

    Parameters
    ----------
    epochs : int
        Training epochs per fit and per ``partial_fit``.
    train_batch_size : int
        Training mini-batch size (``batch_size`` of the runtime is the inference batch).
    learning_rate, weight_decay : float
        Adam's step size and L2 penalty.
    checkpoint_dir : str or None
        Save the training state there after every epoch and resume from it when present.
    float32_training : bool
        Fit in float32 whatever the runtime's precision, training data cached in float32
        (module docstring); False: the runtime's precision and float16 caches.

    Attributes
    ----------
    train_losses_ : list of float
        Mean training loss of every epoch of every fit so far.
    """

    traits = MethodTraits(trains_on_fit_images=True, partial_fit="fine-tune")

    epochs: int = 20
    train_batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    checkpoint_dir: str | None = None
    float32_training: bool = False

    def partial_fit(self, images: ImageInput, *, skip_invalid: bool = False) -> "TrainedModel":
        """:meth:`AnomalyModel.partial_fit`, in float32 with ``float32_training``."""
        if not self.float32_training:
            return super().partial_fit(images, skip_invalid=skip_invalid)
        runtime = self.runtime
        self.set_runtime(precision="float32")
        try:
            return super().partial_fit(images, skip_invalid=skip_invalid)
        finally:
            self.set_runtime(runtime)

    def _validate_params(self) -> None:
        super()._validate_params()
        check_training_params(self.epochs, self.train_batch_size, self.learning_rate, self.weight_decay)

    def _cache(self, batches: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """:func:`flawmap.training.cache_batches` in float32 with ``float32_training``, else float16."""
        return cache_batches(batches, torch.float32 if self.float32_training else torch.float16)

    def _train(
        self, network: nn.Module, data: Sequence[torch.Tensor], loss: Callable[[Batch, torch.Generator], torch.Tensor], what: str
    ) -> None:
        """Train ``network`` on ``data`` (tensors ``N x ...``, moved to the runtime's device) with
        ``loss(batch, generator)``; the epoch losses join those of earlier fits in ``train_losses_``."""
        earlier_losses = getattr(self, "train_losses_", [])
        device = self.runtime.torch_device
        history = train(
            network,
            [tensor.to(device) for tensor in data],
            loss,
            epochs=self.epochs,
            batch_size=self.train_batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.random_state + self.n_fits_,
            checkpoint=fit_checkpoint(self, earlier_losses),
            progress=f"training {what}" if self.runtime.progress else None,
        )
        self.train_losses_ = earlier_losses + history.losses
