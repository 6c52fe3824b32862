"""What post-processing needs without torch: the smoothing kernel, resizing a map to its image's
original size, and score thresholds.

The maps themselves come from :class:`flawmap.postprocessor.PostProcessor` (upsampling and
smoothing, in prediction and inside exported graphs alike); resizing to each image's original
size and the thresholds are shared with the torch-free onnxruntime path, so this module imports
torch only inside :func:`upsample`, the bilinear resize methods use between their own grids.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

DEFAULT_SIGMA = 4.0


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of radius ``ceil(4 sigma)``; float32, shape (2r + 1,)."""
    radius = max(1, math.ceil(4.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def upsample(patch_scores: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of score grids: (B, h, w) -> (B, H, W)."""
    import torch.nn.functional as F

    return F.interpolate(patch_scores.unsqueeze(1), size=size_hw, mode="bilinear", align_corners=False).squeeze(1)


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
