"""What every method's inference is: a :class:`Scorer`, one ``nn.Module`` from images to patch scores.

``predict``, ``evaluate``, ONNX export and the server all run a method's scorer, so there is one
inference path; the postprocessing after it (:class:`flawmap.postprocessor.PostProcessor`) is shared.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from flawmap.backbones import Backbone
from flawmap.runtime import autocast


class PatchScores(NamedTuple):
    """What a scorer returns: ``patch_scores`` (B, h, w) and, for methods that define their own,
    ``image_scores`` (B,); None means "the maximum of the smoothed anomaly map"."""

    patch_scores: torch.Tensor
    image_scores: torch.Tensor | None = None



class Scorer(nn.Module):
    """A method's whole inference: images ``B x 3 x S x S`` in [0, 1] -> :class:`PatchScores`.

    ``forward(images) = score(embed(images))``. Subclasses implement :meth:`embed` (the frozen
    backbone's levels to the method's features; used for fitting too) and :meth:`score`. Fitted
    tensors are buffers or submodules (search indexes, networks), so ``.to(device)`` moves them
    all. Written to be traceable: no Python branches on data values, no SciPy.

    ``low_precision`` (set by :meth:`set_precision`, from the model's runtime) is the autocast
    dtype of the networks (None: float32); search indexes among the submodules follow it.
    """

    def __init__(self, backbone: Backbone, taps: Sequence[str]) -> None:
        super().__init__()
        backbone.tap_info(taps)
        self.backbone = backbone
        self.taps = tuple(taps)
        self.low_precision: torch.dtype | None = None

    def set_precision(self, low_precision: torch.dtype | None) -> None:
        """Use ``low_precision`` arithmetic (None: float32) in networks and searches from now on."""
        self.low_precision = low_precision
        for module in self.modules():
            if module is not self and hasattr(module, "set_precision"):
                module.set_precision(low_precision)

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context of this scorer's networks on ``device``."""
        return autocast(device, self.low_precision)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped backbone maps (B, C_l, H_l, W_l), finest first, in float32."""
        with self.autocast(images.device):
            levels = self.backbone.features(images, self.taps)
        return [level.float() for level in levels]

    def embed(self, images: torch.Tensor) -> Any:
        """Images (B, 3, S, S) -> the method's features."""
        raise NotImplementedError

    def score(self, features: Any) -> PatchScores:
        """The method's features -> patch scores (and image scores)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> PatchScores:
        return self.score(self.embed(images))

    def export_error(self) -> str | None:
        """Why this scorer cannot be exported to ONNX, in one line; None when it can."""
        return None
