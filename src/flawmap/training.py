"""The training loop shared by the methods that train networks (RLR; later Uninformed Students,
multiresolution knowledge distillation, FYD).

A method supplies a network, its training data (tensors indexed along dim 0: cached features
or images) and a loss ``loss(batch, generator) -> scalar``; :func:`train` owns the rest:

- epochs of mini-batches in a seeded order: one ``torch.Generator`` (``seed``) draws every
  epoch's permutation and is handed to the augmentation and the loss for their noise, so a run
  is fixed by its seed;
- the optimizer (Adam by default, learning rate, weight decay), created afresh by every call;
- model selection: the weights after the last epoch (default), or those of the epoch with the
  lowest training loss or the lowest ``validation_loss()`` (a loss on held-out NORMAL images;
  never anomalies);
- checkpoints: after every epoch the network, optimizer, generator and losses are written as a
  record (:func:`flawmap.io.write_record`: safetensors + JSON, atomic, no pickle). A call with
  the same checkpoint continues from the last finished epoch and ends with exactly the weights
  of an uninterrupted run; a checkpoint written for other settings or data is refused.

Training starts from the network's current weights, so calling :func:`train` again on new data
continues training a trained network (how ``partial_fit`` learns more), with a fresh optimizer.

The network is in train mode during the epochs and in eval mode afterwards. The loop never
autocasts: a loss that runs networks in low precision does it itself (``scorer.autocast``);
weights, gradients and the optimizer stay float32.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from flawmap import io
from flawmap.errors import FlawmapError

Batch = list[torch.Tensor]
"""One mini-batch: the rows of every data tensor, ``B x ...`` each."""

SELECTIONS = ("last", "train_loss", "validation_loss")
"""Which epoch's weights :func:`train` keeps."""

CHECKPOINT_DOCUMENT = "training.json"
"""The checkpoint record's JSON document in the checkpoint folder."""

_DATA_TOLERANCE = 1e-3
"""Relative tolerance on the data summary when resuming (features may differ by rounding)."""


@dataclass(frozen=True)
class Checkpoint:
    """Where to keep a run's training state, and what identifies the run.

    Attributes
    ----------
    folder : Path
        Holds one run's checkpoint (``training.json`` and its tensor files).
    settings : dict
        JSON values that must be equal to resume (the method's hyper-parameters, which fit of
        the model this is, ...); the loop adds its own settings and a summary of the data.
        The number of epochs is never part of it: a run may be resumed with more epochs.
    """

    folder: Path
    settings: dict[str, Any]


@dataclass(frozen=True)
class History:
    """What :func:`train` did.

    Attributes
    ----------
    losses : list of float
        Mean training loss of each epoch.
    validation_losses : list of float
        ``validation_loss()`` after each epoch; empty without one.
    selected_epoch : int
        Index (0-based) of the epoch whose weights the network now has.
    """

    losses: list[float]
    validation_losses: list[float]
    selected_epoch: int


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Networks built inside start from weights fixed by ``seed``; torch's global generator is
    left as it was (forked)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cache_batches(batches: Iterable[Sequence[torch.Tensor]], dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Concatenate embedded batches (each a sequence of tensors ``B x ...``) into one ``dtype``
    CPU tensor ``N x ...`` per position in the sequence: a trained method's training data
    (float16 by default: half the memory of float32, and more exact than the features' bfloat16
    arithmetic where the runtime uses it).

    The batches are consumed completely before concatenating, so the result is built outside
    the inference mode the shared pipeline embeds in, and can take part in training.
    """
    stored: list[list[torch.Tensor]] = []
    for batch in batches:
        if not stored:
            stored = [[] for _ in batch]
        for parts, tensor in zip(stored, batch):
            parts.append(tensor.to("cpu", dtype).contiguous())
    if not stored:
        raise FlawmapError("no valid training image left: every image was skipped")
    return [torch.cat(parts) for parts in stored]


def train(
    network: nn.Module,
    data: Sequence[torch.Tensor],
    loss: Callable[[Batch, torch.Generator], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
    seed: int = 0,
    augment: Callable[[Batch, torch.Generator], Batch] | None = None,
    selection: str = "last",
    validation_loss: Callable[[], float] | None = None,
    checkpoint: Checkpoint | None = None,
    progress: str | None = None,
) -> History:
    """Train ``network`` from its current weights for ``epochs`` epochs over ``data``.

    Parameters
    ----------
    network : nn.Module
        Every parameter that requires grad is optimised.
    data : sequence of Tensor, each of shape (N, ...)
        Training tensors indexed together along dim 0; batches are taken on their device.
    loss : callable (batch, generator) -> Tensor of shape ()
        Loss of one batch (after ``augment``); ``generator`` is the run's generator (on the
        CPU) for any noise it draws.
    epochs, batch_size : int
        The last batch of an epoch may be smaller.
    learning_rate, weight_decay : float
        Passed to ``optimizer_class(parameters, lr=..., weight_decay=...)``.
    optimizer_class : torch.optim.Optimizer subclass
        Adam by default.
    seed : int
        Seeds the generator of batch order, augmentation and loss noise.
    augment : callable (batch, generator) -> batch, optional
        Applied to each batch before the loss.
    selection : {"last", "train_loss", "validation_loss"}
        Keep the last epoch's weights, or the weights of the epoch with the lowest mean
        training loss or the lowest ``validation_loss()``.
    validation_loss : callable () -> float, optional
        Loss of the current network on held-out normal images, called after each epoch in eval
        mode without gradients. Required by, and only allowed with, ``selection="validation_loss"``.
    checkpoint : Checkpoint, optional
        Save the state after every epoch and resume from it when present.
    progress : str, optional
        Description of a progress bar over the epochs (showing the loss); None shows none.

    Returns
    -------
    History
        The losses of all epochs of this run (resumed ones included) and the selected epoch;
        the network holds that epoch's weights, in eval mode.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if (selection == "validation_loss") != (validation_loss is not None):
        raise ValueError('validation_loss is required by, and only used with, selection="validation_loss"')
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer_class(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    run = _Run(selection)
    if checkpoint is not None:
        training = {
            "batch_size": batch_size, "learning_rate": learning_rate, "weight_decay": weight_decay,
            "optimizer": optimizer_class.__name__, "seed": seed, "selection": selection,
        }
        settings = json.loads(json.dumps({"method": checkpoint.settings, "training": training}))  # as JSON reads back
        identity = {"settings": settings, "data": _data_summary(data)}
        if (checkpoint.folder / CHECKPOINT_DOCUMENT).is_file():
            run = _resume(checkpoint.folder, identity, epochs, selection, network, optimizer, generator)
    bar = tqdm(range(len(run.losses), epochs), desc=progress, disable=progress is None, leave=False, file=sys.stderr)
    try:
        for _ in bar:
            network.train()
            run.losses.append(_train_epoch(network, data, loss, optimizer, generator, batch_size, augment))
            network.eval()
            if validation_loss is not None:
                with torch.no_grad():
                    run.validation_losses.append(float(validation_loss()))
            run.keep_if_best(network)
            bar.set_postfix(loss=f"{run.losses[-1]:.4g}")
            if checkpoint is not None:
                _save(checkpoint.folder, identity, run, network, optimizer, generator)
    finally:
        network.eval()
    if run.best_state is not None:
        network.load_state_dict(run.best_state)
    return History(run.losses, run.validation_losses, run.selected_epoch())


def _train_epoch(
    network: nn.Module,
    data: Sequence[torch.Tensor],
    loss: Callable[[Batch, torch.Generator], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    batch_size: int,
    augment: Callable[[Batch, torch.Generator], Batch] | None,
) -> float:
    """One pass over ``data`` in a random order; the mean loss per sample."""
    n_samples = data[0].shape[0]
    order = torch.randperm(n_samples, generator=generator)
    total = 0.0
    for start in range(0, n_samples, batch_size):
        rows = order[start : start + batch_size]
        batch = [tensor[rows.to(tensor.device)] for tensor in data]
        if augment is not None:
            batch = augment(batch, generator)
        batch_loss = loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        total += batch_loss.item() * rows.numel()
    return total / n_samples


class _Run:
    """The losses so far and, when selecting, the best weights so far (on the CPU)."""

    def __init__(self, selection: str) -> None:
        self.selection = selection
        self.losses: list[float] = []
        self.validation_losses: list[float] = []
        self.best_state: dict[str, torch.Tensor] | None = None

    def selection_losses(self) -> list[float]:
        return self.validation_losses if self.selection == "validation_loss" else self.losses

    def selected_epoch(self) -> int:
        """The last epoch, or the first epoch of lowest selection loss."""
        if self.selection == "last":
            return len(self.losses) - 1
        scores = self.selection_losses()
        return min(range(len(scores)), key=scores.__getitem__)

    def keep_if_best(self, network: nn.Module) -> None:
        """After an epoch: copy the weights if that epoch is the one selected so far."""
        if self.selection != "last" and self.selected_epoch() == len(self.losses) - 1:
            self.best_state = {name: tensor.detach().cpu().clone() for name, tensor in network.state_dict().items()}


def _data_summary(data: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Shape, mean and RMS of each data tensor: what identifies the training data on resume."""
    summary = []
    for tensor in data:
        values = tensor.double()
        rms = values.square().mean().sqrt()
        summary.append({"shape": list(tensor.shape), "mean": values.mean().item(), "rms": rms.item()})
    return summary


def _same_data(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> bool:
    """Whether two data summaries describe the same data, up to rounding."""
    if [entry["shape"] for entry in saved] != [entry["shape"] for entry in current]:
        return False
    return all(
        math.isclose(old[key], new[key], rel_tol=_DATA_TOLERANCE, abs_tol=_DATA_TOLERANCE)
        for old, new in zip(saved, current)
        for key in ("mean", "rms")
    )


def _save(
    folder: Path,
    identity: dict[str, Any],
    run: _Run,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Write the state after an epoch as one record (it replaces the previous epoch's)."""
    optimizer_state = optimizer.state_dict()
    slots = {f"{index}.{slot}": value for index, state in optimizer_state["state"].items() for slot, value in state.items()}
    groups = {"network": network.state_dict(), "optimizer": slots, "generator": {"state": generator.get_state()}}
    if run.best_state is not None:
        groups["best"] = run.best_state
    document = {
        **identity,
        "losses": run.losses,
        "validation_losses": run.validation_losses,
        "optimizer_groups": optimizer_state["param_groups"],
    }
    io.write_record(folder, CHECKPOINT_DOCUMENT, document, groups)


def _resume(
    folder: Path,
    identity: dict[str, Any],
    epochs: int,
    selection: str,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> _Run:
    """Load the checkpoint in ``folder`` into the network, optimizer and generator; its run so far.

    ``identity``: the settings (equal) and data summary (close) the checkpoint must have.
    """
    path = folder / CHECKPOINT_DOCUMENT
    document, files = io.read_record(folder, CHECKPOINT_DOCUMENT)
    if document.get("settings") != identity["settings"] or not _same_data(document.get("data", []), identity["data"]):
        raise FlawmapError(f"{path}: checkpoint written for other settings or training data; use another checkpoint folder")
    if len(document["losses"]) > epochs:
        raise FlawmapError(f"{path}: already trained {len(document['losses'])} epochs, more than epochs={epochs}")
    tensors = {group: io.read_tensor_file(file) for group, file in files.items()}
    network.load_state_dict(tensors["network"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors["optimizer"].items():
        index, slot = name.split(".", 1)
        state.setdefault(int(index), {})[slot] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": document["optimizer_groups"]})
    generator.set_state(tensors["generator"]["state"])
    run = _Run(selection)
    run.losses, run.validation_losses = list(document["losses"]), list(document["validation_losses"])
    run.best_state = tensors.get("best")
    return run


RUN_ONLY_PARAMS = frozenset({"epochs", "checkpoint_dir"})
"""Hyper-parameters that may change between a checkpointed fit and its resumption."""


def fit_checkpoint(model: Any, earlier_losses: list[float]) -> Checkpoint | None:
    """The checkpoint of a trained method's current fit, or None without ``model.checkpoint_dir``.

    ``model`` is a fitting :class:`flawmap.models.AnomalyModel` with a ``checkpoint_dir``
    hyper-parameter; its n-th fit goes to ``<checkpoint_dir>/fit-<n>``. A resumed fit must share
    the hyper-parameters (those of :data:`RUN_ONLY_PARAMS` aside) and the losses of the model's
    earlier fits (``earlier_losses``).
    """
    if model.checkpoint_dir is None:
        return None
    params = {name: value for name, value in model.get_params().items() if name not in RUN_ONLY_PARAMS}
    folder = Path(model.checkpoint_dir) / f"fit-{model.n_fits_ + 1}"
    return Checkpoint(folder, {"params": params, "earlier_losses": earlier_losses})
