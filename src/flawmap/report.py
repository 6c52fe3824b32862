"""Heat-map overlays that a person can read.

The colour scale is fixed per model, not per image, so the same colour means the same score in
every picture. With ``low`` the median pixel score of the normal calibration images and ``high``
their calibrated maximum, pixels below ``low + (high - low) / 2`` stay uncoloured (a clean part
looks clean), blue-green marks the upper normal range, yellow the normal maximum and red twice
its distance from the median.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flawmap.data import read_image
from flawmap.prediction import Prediction, Predictor

# Colour ramp from blue through green and yellow to red: (position, (r, g, b)).
_RAMP = np.array([[0.0, 0, 0, 255], [0.35, 0, 200, 255], [0.5, 0, 220, 0], [0.7, 255, 230, 0], [1.0, 230, 0, 0]])


def colorize(levels: np.ndarray) -> np.ndarray:
    """Levels in [0, 1], shape (H, W), to uint8 RGB colours, shape (H, W, 3)."""
    channels = [np.interp(levels, _RAMP[:, 0], _RAMP[:, i]) for i in (1, 2, 3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """Blend a heat map over an image.

    Parameters
    ----------
    image : ndarray (H, W, 3) uint8
    anomaly_map : ndarray (H, W) float
    low, high : float
        Scores shown as fully transparent and as full red.

    Returns
    -------
    ndarray (H, W, 3) uint8
    """
    levels = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    alpha = (0.15 + 0.55 * levels)[..., None] * (levels[..., None] > 0)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(levels).astype(np.float32)
    return blended.round().astype(np.uint8)


def write_overlay(model: Predictor, prediction: Prediction, path: Path) -> Path:
    """Save ``original | overlay`` side by side with the score and verdict as a PNG."""
    image = read_image(prediction.sample.image_path)
    normal_spread = model.map_high_ - model.map_low_
    shown_from, shown_to = model.map_low_ + 0.5 * normal_spread, model.map_low_ + 2.0 * normal_spread
    panel = np.concatenate([image, overlay(image, prediction.anomaly_map, shown_from, shown_to)], axis=1)
    picture = Image.fromarray(panel)
    verdict = "ANOMALOUS" if prediction.is_anomalous else "normal"
    caption = f"score {prediction.score:.3f} (threshold {model.threshold_:.3f}): {verdict}"
    draw = ImageDraw.Draw(picture)
    box = draw.textbbox((6, 6), caption)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((6, 6), caption, fill=(255, 80, 80) if prediction.is_anomalous else (255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
