"""Overlays: a fixed colour scale per model with the threshold as the normal/anomalous boundary,
and captions and a colour bar that never cover the image."""

import numpy as np
import pytest
from PIL import Image

from flawmap.data import read_image
from flawmap.report import THRESHOLD_LEVEL, _font, colour_scale, colorize, overlay, write_overlay


def test_threshold_is_the_boundary_between_normal_and_anomalous_colours():
    below, above = colorize(np.array([[THRESHOLD_LEVEL - 0.01, THRESHOLD_LEVEL + 0.01]]))[0]
    assert below[2] > below[0]  # blue-green side
    assert above[0] > 200 and above[2] < 50  # yellow-red side


def test_colour_scale_is_fixed_by_the_model_not_by_the_image(tiny_model):
    low, high = colour_scale(tiny_model)
    assert (low + high) / 2 == pytest.approx(tiny_model.map_high_)
    grey = np.full((16, 16, 3), 128, dtype=np.uint8)
    values = np.linspace(low, high, 16, dtype=np.float32)[None, :].repeat(16, axis=0)
    hotter = values.copy()
    hotter[:, :4] += 10 * (high - low)  # another image with a far larger maximum
    first, second = overlay(grey, values, low, high), overlay(grey, hotter, low, high)
    np.testing.assert_array_equal(first[:, 4:], second[:, 4:])  # same score, same colour
    clean = overlay(grey, np.full((16, 16), low, dtype=np.float32), low, high)
    np.testing.assert_array_equal(clean, grey)  # normal parts stay uncoloured


def test_overlay_picture_keeps_the_image_visible_with_caption_and_colour_bar_below(tiny_model, tiny_dataset, tmp_path):
    path = sorted((tiny_dataset / "test").glob("*/*.png"))[0]
    prediction = tiny_model.predict(path)[0]
    written = write_overlay(tiny_model, prediction, tmp_path / "o.png")
    picture = np.asarray(Image.open(written).convert("RGB"))
    image = read_image(path)
    height, width = image.shape[:2]
    assert picture.shape[1] == 2 * width and picture.shape[0] > height
    np.testing.assert_array_equal(picture[:height, :width], image)  # nothing is drawn over the image
    below = picture[height:]
    assert len({tuple(pixel) for pixel in below.reshape(-1, 3)}) > 20  # the colour bar's gradient and text
    assert (below == 255).all(axis=2).any()  # the white threshold marker


def test_text_is_scaled_to_the_picture():
    assert _font(2000).size > _font(400).size >= 9
