"""Tests for flawmap.data.loader: ordered, bounded, batched decoding of files and arrays."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawmap.data import loader
from flawmap.data.datasets import Sample
from flawmap.data.loader import InvalidImageWarning, iter_batches
from flawmap.errors import FlawmapError


def uniform_samples(folder: Path, count: int) -> list[Sample]:
    """``count`` PNGs of uniform grey ``10 * i`` and size ``(8 + i) x (12 + i)``, as normal samples."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(np.full((8 + index, 12 + index), 10 * index, dtype=np.uint8)).save(path)
        samples.append(Sample(image_path=path))
    return samples


def test_batches_keep_order_with_remainder(tmp_path: Path) -> None:
    samples = uniform_samples(tmp_path, 7)
    batches = list(iter_batches(samples, image_size=16, batch_size=3, num_workers=2))
    assert [len(batch.samples) for batch in batches] == [3, 3, 1]
    assert [sample for batch in batches for sample in batch.samples] == samples
    assert all(batch.images.dtype == np.float32 and batch.images.flags.c_contiguous for batch in batches)
    images = np.concatenate([batch.images for batch in batches])
    assert images.shape == (7, 3, 16, 16)
    expected_levels = np.arange(7, dtype=np.float32) * 10 / np.float32(255)  # exactly uint8 / 255 in float32
    np.testing.assert_array_equal(images.max(axis=(1, 2, 3)), expected_levels)
    np.testing.assert_array_equal(images.min(axis=(1, 2, 3)), expected_levels)
    assert [hw for batch in batches for hw in batch.original_hw] == [(8 + i, 12 + i) for i in range(7)]
    assert all(mask is None for batch in batches for mask in batch.masks)


def test_resize_squashes_without_cropping_into_unit_range(tmp_path: Path) -> None:
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    path = tmp_path / "half.png"
    Image.fromarray(pixels).save(path)
    (batch,) = iter_batches([Sample(image_path=path)], image_size=10)
    image = batch.images[0]
    assert image.min() == 0.0 and image.max() == 1.0
    assert np.all(image[:, :, :4] == 0) and np.all(image[:, :, 6:] == 1)


def test_masks_at_original_size(tmp_path: Path) -> None:
    normal = uniform_samples(tmp_path, 1)[0]
    mask_pixels = np.zeros((8, 12), dtype=np.uint8)
    mask_pixels[0, 0], mask_pixels[1, 1] = 255, 1
    mask_path = tmp_path / "000_mask.png"
    Image.fromarray(mask_pixels).save(mask_path)
    mvtec = Sample(image_path=normal.image_path, defect_type="crack", mask_path=mask_path)
    visa = Sample(image_path=normal.image_path, defect_type="anomaly", mask_path=mask_path, mask_threshold=0)
    unlabelled = Sample(image_path=normal.image_path, defect_type="crack")
    (batch,) = iter_batches([normal, mvtec, visa, unlabelled], image_size=8, load_masks=True)
    good_mask, mvtec_mask, visa_mask, no_mask = batch.masks
    assert good_mask.shape == (8, 12) and good_mask.dtype == bool and not good_mask.any()
    assert np.argwhere(mvtec_mask).tolist() == [[0, 0]]
    assert np.argwhere(visa_mask).tolist() == [[0, 0], [1, 1]]
    assert no_mask is None


def test_invalid_image_raises_by_default_and_is_skipped_on_request(tmp_path: Path) -> None:
    samples = uniform_samples(tmp_path, 5)
    samples[2].image_path.write_bytes(b"not a png")
    with pytest.raises(FlawmapError, match="002.png"):
        list(iter_batches(samples, image_size=8, batch_size=2))
    with pytest.warns(InvalidImageWarning, match=r"skipping .*002\.png: .*not an image file"):
        batches = list(iter_batches(samples, image_size=8, batch_size=2, skip_invalid=True))
    assert [len(batch.samples) for batch in batches] == [2, 2]
    assert [sample for batch in batches for sample in batch.samples] == samples[:2] + samples[3:]


def test_mask_of_wrong_size_is_an_invalid_sample(tmp_path: Path) -> None:
    image_path = uniform_samples(tmp_path, 1)[0].image_path
    mask_path = tmp_path / "small_mask.png"
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(mask_path)
    sample = Sample(image_path=image_path, defect_type="crack", mask_path=mask_path)
    with pytest.raises(FlawmapError, match="is 2x2 but its image is 12x8"):
        list(iter_batches([sample], image_size=8, load_masks=True))


def test_numpy_arrays_and_samples_mix(tmp_path: Path) -> None:
    grey = np.full((5, 6), 51, dtype=np.uint8)
    rgb = np.zeros((7, 3, 3), dtype=np.uint8)
    rgb[..., 2] = 255
    rgba = np.concatenate([rgb, np.zeros((7, 3, 1), dtype=np.uint8)], axis=2)
    (file_sample,) = uniform_samples(tmp_path, 1)
    (batch,) = iter_batches([grey, file_sample, rgb, rgba], image_size=4, load_masks=True)
    assert [sample.source for sample in batch.samples[::2]] == ["array 0", "array 2"]
    assert batch.samples[0].image_path is None and batch.samples[0].pixels is grey
    assert batch.samples[1] is file_sample
    assert batch.original_hw == [(5, 6), (8, 12), (7, 3), (7, 3)]
    np.testing.assert_allclose(batch.images[0], np.full((3, 4, 4), 0.2), rtol=1e-6)
    np.testing.assert_array_equal(batch.images[2], batch.images[3])
    assert batch.images[2, 2].min() == 1.0 and batch.images[2, :2].max() == 0.0
    assert all(mask is not None and not mask.any() for mask in batch.masks)


def test_bad_arrays_and_arguments_raise() -> None:
    with pytest.raises(FlawmapError, match=r"array 0: expected a uint8 array"):
        list(iter_batches([np.zeros((4, 4), dtype=np.float32)], image_size=4))
    with pytest.raises(FlawmapError, match="shape"):
        list(iter_batches([np.zeros((4, 4, 2), dtype=np.uint8)], image_size=4))
    with pytest.raises(FlawmapError, match="batch_size must be at least 1"):
        iter_batches([], image_size=4, batch_size=0)  # raised at the call, before iterating
    assert list(iter_batches([], image_size=4)) == []


def test_decoding_runs_a_bounded_distance_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    monkeypatch.setattr(loader, "_array_to_rgb", lambda array, name: decoded.append(name) or array)
    images = [np.zeros((4, 4, 3), dtype=np.uint8)] * 60
    batches = iter_batches(images, image_size=4, batch_size=2, num_workers=2)
    next(batches)
    time.sleep(0.3)  # time enough for the workers to decode all 60, were they allowed to
    assert 2 <= len(decoded) <= 10  # about two batches ahead, never all 60 up front
    batches.close()


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    list(iter_batches(uniform_samples(tmp_path, 3), image_size=4, progress="decoding"))
    captured = capsys.readouterr()
    assert "decoding" in captured.err and captured.out == ""


def test_images_smaller_than_the_patch_grid_are_a_clear_error(tmp_path: Path) -> None:
    """A 64 px model has an 8 x 8 patch grid: a 1 x 1 or 7 x 30 image would be a silent guess."""
    for size in ((1, 1), (7, 30)):
        path = tmp_path / f"tiny_{size[0]}x{size[1]}.png"
        Image.new("RGB", size[::-1]).save(path)
        with pytest.raises(FlawmapError, match=rf"{path.name}: image is {size[1]}x{size[0]}, smaller than the model's 8x8 patch grid"):
            list(iter_batches([Sample(image_path=path)], 64))
    with pytest.raises(FlawmapError, match="array 0: image is 2x2"):
        list(iter_batches([np.zeros((2, 2, 3), dtype=np.uint8)], 64))
    (batch,) = iter_batches([np.zeros((8, 8, 3), dtype=np.uint8)], 64)
    assert batch.images.shape == (1, 3, 64, 64)


def test_pil_images_are_taken_like_arrays() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    (from_pil,) = iter_batches([Image.fromarray(pixels), Image.fromarray(pixels).convert("L")], 16, batch_size=2)
    (from_array,) = iter_batches([pixels], 16)
    np.testing.assert_array_equal(from_pil.images[:1], from_array.images)
    assert from_pil.original_hw == [(20, 30), (20, 30)]
    with pytest.raises(FlawmapError, match=r"samples\[0\] is a str"):
        list(iter_batches(["not a sample"], 16))
