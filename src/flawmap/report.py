"""Heat-map overlays that a person can read.

The colour scale is fixed per model at calibration, not per image, so the same colour means the
same score in every picture of that model. With ``low`` the median pixel score of the normal
calibration images and ``threshold`` their calibrated maximum (``map_high_``: a normal image has
a pixel above it at about the model's false-alarm rate), the scale runs from ``low`` to
``low + 2 (threshold - low)``, which puts the threshold in its middle:

- the lower half of the normal range stays uncoloured (a clean part looks clean);
- the upper normal range is blue to green, faint;
- the threshold is the boundary between normal and anomalous colours: above it, yellow to red,
  strong.

A picture is ``original | overlay`` side by side, with a caption strip (score, threshold, verdict,
number of regions) and a colour bar with the threshold marked below them, never drawn over the
image; the text is scaled to the picture's width. The overlay outlines the defect regions (the map
above the pixel threshold, :mod:`flawmap.regions`) in cyan, a colour the ramp never takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from flawmap.data import read_image
from flawmap.prediction import Prediction, Predictor

#: Position of the threshold on the colour scale.
THRESHOLD_LEVEL = 0.5
#: Below this level nothing is coloured.
CLEAR_LEVEL = 0.25
# Colour ramp: normal blue -> green up to the threshold, then anomalous yellow -> red: (position, r, g, b).
_RAMP = np.array([
    [0.0, 0, 90, 255], [THRESHOLD_LEVEL - 1e-6, 0, 200, 120], [THRESHOLD_LEVEL, 255, 230, 0], [1.0, 230, 0, 0],
])
#: Colour of the defect regions' outline on overlays: cyan, outside the blue-to-red ramp.
REGION_COLOUR = np.array([0, 255, 255], dtype=np.uint8)
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_ANOMALOUS_TEXT = (255, 90, 90)


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
        The ends of the colour scale: fully transparent and full red; the middle is the
        normal/anomalous boundary.

    Returns
    -------
    ndarray (H, W, 3) uint8
    """
    levels = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    normal_alpha = 0.15 + 0.25 * (levels - CLEAR_LEVEL) / (THRESHOLD_LEVEL - CLEAR_LEVEL)
    anomalous_alpha = 0.55 + 0.25 * (levels - THRESHOLD_LEVEL) / (1.0 - THRESHOLD_LEVEL)
    alpha = np.where(levels >= THRESHOLD_LEVEL, anomalous_alpha, np.where(levels > CLEAR_LEVEL, normal_alpha, 0.0))
    blended = (1.0 - alpha[..., None]) * image.astype(np.float32) + alpha[..., None] * colorize(levels).astype(np.float32)
    return blended.round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The border pixels (H x W bool) of the True areas of ``mask`` (H x W bool), about
    ``max(H, W) / 200`` pixels wide (at least 1), inside the areas."""
    width = max(1, max(mask.shape) // 200)
    return mask & ~ndimage.binary_erosion(mask, iterations=width)


def colour_scale(model: Predictor) -> tuple[float, float]:
    """The model's fixed colour scale ``(low, high)``: the pixel threshold ``map_high_`` in the middle."""
    return model.map_low_, model.map_high_ + (model.map_high_ - model.map_low_)


def write_overlay(model: Predictor, prediction: Prediction, path: Path) -> Path:
    """Save ``original | overlay`` (defect regions outlined) with a caption (score, threshold,
    verdict, regions) and a colour bar marking the pixel threshold, below the images, as a PNG."""
    image = read_image(prediction.sample.image_path)
    low, high = colour_scale(model)
    heat = overlay(image, prediction.anomaly_map, low, high)
    heat[outline(prediction.anomaly_map > prediction.pixel_threshold)] = REGION_COLOUR
    panel = np.concatenate([image, heat], axis=1)
    width = panel.shape[1]
    font = _font(width)
    line_height = int(font.size * 1.5)
    verdict = "ANOMALOUS" if prediction.is_anomalous else "normal"
    n_regions = len(prediction.regions)
    caption = f"score {prediction.score:.3f}  threshold {model.threshold_:.3f}  {verdict}  {n_regions} region{'s' * (n_regions != 1)}"
    bar = _colour_bar(width, line_height, font, model.map_high_)
    picture = Image.new("RGB", (width, panel.shape[0] + line_height + bar.height), _BACKGROUND)
    picture.paste(Image.fromarray(panel), (0, 0))
    draw = ImageDraw.Draw(picture)
    draw.text(
        (line_height // 4, panel.shape[0] + line_height // 6), _fit(draw, caption, font, width), font=font,
        fill=_ANOMALOUS_TEXT if prediction.is_anomalous else _TEXT,
    )
    picture.paste(bar, (0, panel.shape[0] + line_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def _colour_bar(width: int, line_height: int, font: ImageFont.ImageFont, pixel_threshold: float) -> Image.Image:
    """A strip: the colour ramp (``line_height / 2`` tall) with the threshold marked, and its labels."""
    ramp_height = max(4, line_height // 2)
    strip = Image.new("RGB", (width, ramp_height + line_height), _BACKGROUND)
    levels = np.linspace(0.0, 1.0, width)[None, :].repeat(ramp_height, axis=0)
    strip.paste(Image.fromarray(colorize(levels)), (0, 0))
    draw = ImageDraw.Draw(strip)
    middle = round(THRESHOLD_LEVEL * (width - 1))
    draw.line([(middle, 0), (middle, ramp_height + line_height // 4)], fill=(255, 255, 255), width=max(1, width // 300))
    label_y = ramp_height + line_height // 8
    draw.text((2, label_y), "normal", font=font, fill=_TEXT)
    marker = f"pixel threshold {pixel_threshold:.3g}"
    draw.text((middle, label_y), marker, font=font, fill=_TEXT, anchor="ma")
    draw.text((width - 2, label_y), "anomalous", font=font, fill=_TEXT, anchor="ra")
    return strip


def _font(width: int) -> ImageFont.ImageFont:
    """The default font at a size that suits a picture ``width`` pixels wide."""
    return ImageFont.load_default(size=max(9, min(48, width // 40)))


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits in ``width`` pixels."""
    while len(text) > 4 and draw.textlength(text, font=font) > width:
        text = text[:-5] + "..."
    return text
