"""From raw patch scores to anomaly maps at the input size, and score thresholds.

Every method's ``B x h x w`` patch scores go through the same steps: bilinear upsampling to the
network input size, Gaussian smoothing (sigma 4 px, as in PatchCore and PaDiM), then resizing to
each image's original size. An exported model (:mod:`flawmap.export`) does the first two steps
inside its graph; the last step and the thresholds are shared by both, so this module imports
torch only inside the functions that take tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

if TYPE_CHECKING:
    import torch

DEFAULT_SIGMA = 4.0


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of radius ``ceil(4 sigma)``; float32, shape (2r + 1,)."""
    radius = max(1, math.ceil(4.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Separable Gaussian smoothing with mirrored borders, on the CPU.

    SciPy's 1-D correlations measured about 5x faster than two torch convolutions for
    single-channel 256 x 256 maps.

    Parameters
    ----------
    maps : Tensor of shape (B, H, W)
    sigma : float
        Standard deviation in pixels; 0 returns the input.

    Returns
    -------
    Tensor of shape (B, H, W), float32, on the CPU
    """
    import torch

    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma)
    planes = maps.detach().float().cpu().numpy()
    planes = ndimage.correlate1d(planes, kernel, axis=1, mode="mirror")
    planes = ndimage.correlate1d(planes, kernel, axis=2, mode="mirror")
    return torch.from_numpy(planes)


def upsample(patch_scores: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of score grids: (B, h, w) -> (B, H, W)."""
    import torch.nn.functional as F

    return F.interpolate(patch_scores.unsqueeze(1), size=size_hw, mode="bilinear", align_corners=False).squeeze(1)


def anomaly_maps(patch_scores: torch.Tensor, image_size: int, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Patch scores (B, h, w) to smoothed maps (B, S, S) at the network input size, on the CPU."""
    return gaussian_blur(upsample(patch_scores.float().cpu(), (image_size, image_size)), sigma)


def to_original_size(anomaly_map: np.ndarray | torch.Tensor, original_hw: tuple[int, int]) -> np.ndarray:
    """One map (S, S) on the CPU (array or tensor) resized bilinearly to the image's original
    (H, W), as float32 numpy.

    Pillow's float resize is used: about 2x faster than ``F.interpolate`` on the CPU, and equal
    to it within 1e-4 relative.
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.shape == tuple(original_hw):
        return values
    height, width = original_hw
    return np.asarray(Image.fromarray(values).resize((width, height), Image.BILINEAR), dtype=np.float32)


def normal_quantile_threshold(normal_scores: np.ndarray, false_alarm_rate: float) -> float:
    """Score threshold from normal images only.

    The smallest observed normal score such that at most ``false_alarm_rate`` of the normal
    scores lie strictly above it; with few scores and a small rate this is their maximum.
    """
    if normal_scores.size == 0:
        raise ValueError("need at least one normal score to calibrate a threshold")
    return float(np.quantile(normal_scores, 1.0 - false_alarm_rate, method="higher"))
