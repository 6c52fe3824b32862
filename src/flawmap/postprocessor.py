"""The one way from a scorer's patch scores to anomaly maps and image scores.

Every method's ``B x h x w`` patch scores go through the same two linear steps, bilinear
upsampling to the network input size ``S x S`` (``align_corners=False``) and Gaussian smoothing
with mirrored borders (sigma 4 px, as in PatchCore and PaDiM; radius ``ceil(4 sigma)``), and the
image score is the scorer's own or, when it has none, the smoothed map's maximum.

Both steps are separable and linear, so together they are one matrix per axis: with ``U`` (S x h)
the 1-D bilinear upsampling and ``K`` (S x S) the 1-D smoothing,

    maps = A_h P A_w^T,    A = K U    (S x h)

two small matrix products per map (at h = 32, S = 256: 2.4 M multiply-adds, a few times faster
than two separable 33-tap correlations on the 256 x 256 upsampled map, and a plain ``MatMul`` in
an ONNX graph). :class:`PostProcessor` is the module that prediction, calibration and the exported
graph (:mod:`flawmap.export`) all run, so the three cannot drift apart. Resizing to each image's
original size and the thresholds stay in :mod:`flawmap.postprocess`, which needs no torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flawmap import postprocess
from flawmap.errors import FlawmapError


class PostProcessor(nn.Module):
    """Patch scores (B, h, w) -> smoothed maps (B, S, S) and image scores (B,), float32.

    Parameters
    ----------
    image_size : int
        ``S``, the side of the network input and of the maps.
    sigma : float
        Standard deviation of the Gaussian smoothing in pixels; 0 turns it off.

    The operator ``A`` of each grid side ``h`` is built on first use and kept (per device).
    """

    def __init__(self, image_size: int, sigma: float) -> None:
        super().__init__()
        if image_size < 1 or not sigma >= 0.0:
            raise FlawmapError(f"need image_size >= 1 and sigma >= 0, got {image_size} and {sigma}")
        self.image_size = image_size
        self.sigma = sigma
        self._operators: dict[tuple[int, str], torch.Tensor] = {}

    def forward(
        self, patch_scores: torch.Tensor, image_scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores (B, h, w) and the scorer's image scores (B,) or None -> maps (B, S, S)
        and image scores (B,): the given ones, else each map's maximum."""
        patch_scores = patch_scores.float()
        rows = self.operator(patch_scores.shape[-2], patch_scores.device)
        columns = self.operator(patch_scores.shape[-1], patch_scores.device)
        maps = rows @ patch_scores @ columns.T  # A_h P A_w^T
        scores = maps.amax(dim=(1, 2)) if image_scores is None else image_scores.float()
        return maps, scores

    def operator(self, grid_side: int, device: torch.device) -> torch.Tensor:
        """``A = K U`` (S, grid_side): upsampling a grid side to ``S``, then smoothing."""
        key = (grid_side, str(device))
        if key not in self._operators:
            operator = smoothing_matrix(self.image_size, self.sigma) @ upsampling_matrix(grid_side, self.image_size)
            self._operators[key] = operator.to(device)
        return self._operators[key]


def upsampling_matrix(grid_side: int, size: int) -> torch.Tensor:
    """``U`` (size, grid_side): 1-D linear interpolation from ``grid_side`` to ``size`` samples
    with ``align_corners=False``, the weights of :func:`flawmap.postprocess.upsample` per axis."""
    identity = torch.eye(grid_side).unsqueeze(1)  # (grid_side, 1, grid_side): one unit impulse per row
    return F.interpolate(identity, size=size, mode="linear", align_corners=False).squeeze(1).T


def smoothing_matrix(size: int, sigma: float) -> torch.Tensor:
    """``K`` (size, size): correlation with the Gaussian of :func:`flawmap.postprocess.gaussian_kernel1d`,
    borders mirrored about the edge sample (``d c b | a b c d | c b a``, SciPy's ``"mirror"``)
    as often as the radius needs; the identity for ``sigma == 0``."""
    if sigma == 0.0 or size == 1:
        return torch.eye(size)
    kernel = torch.from_numpy(postprocess.gaussian_kernel1d(sigma)).double()
    radius = kernel.shape[0] // 2
    outputs = torch.arange(size).view(-1, 1)
    taps = outputs + torch.arange(-radius, radius + 1).view(1, -1)  # (size, 2r + 1) sample positions
    period = 2 * (size - 1)
    folded = taps.remainder(period)
    sources = torch.where(folded < size, folded, period - folded)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.scatter_add_(1, sources, kernel.expand(size, -1).contiguous())
    return matrix.float()
