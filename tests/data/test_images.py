"""Tests for flawmap.data.images: decoding images and masks, listing folders, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawmap.data.datasets import Sample
from flawmap.data.images import list_images, read_image, read_mask
from flawmap.data.loader import iter_batches
from flawmap.errors import FlawmapError

SIXTEEN_BIT_LEVELS = np.array([[0, 128, 385, 386, 25700, 65535]], dtype=np.uint16)
"""16-bit levels and, below, their 8-bit values round(level / 257): 385/257 = 1.498, 386/257 = 1.502."""
EIGHT_BIT_LEVELS = np.array([[0, 0, 1, 2, 100, 255]], dtype=np.uint8)


def save(path: Path, pixels: np.ndarray, **options) -> Path:
    """Write ``pixels`` with Pillow (format from the suffix) and return the path."""
    Image.fromarray(pixels).save(path, **options)
    return path


def mode_of(path: Path) -> str:
    """The Pillow mode ``path`` opens in."""
    with Image.open(path) as image:
        return image.mode


def noise_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random ``uint8 H x W x 3`` pixels."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_by_dtype_range(tmp_path: Path, suffix: str) -> None:
    path = save(tmp_path / f"deep{suffix}", SIXTEEN_BIT_LEVELS)
    assert mode_of(path) == "I;16"
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (1, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], EIGHT_BIT_LEVELS)


def test_32_bit_integer_tiff_is_scaled_like_16_bit(tmp_path: Path) -> None:
    path = save(tmp_path / "int.tif", SIXTEEN_BIT_LEVELS.astype(np.int32))
    assert mode_of(path) == "I"
    np.testing.assert_array_equal(read_image(path)[:, :, 0], EIGHT_BIT_LEVELS)


def test_16_bit_image_is_not_stretched_per_image(tmp_path: Path) -> None:
    dim = np.full((4, 4), 1000, dtype=np.uint16)
    dim[0, 0] = 2000
    image = read_image(save(tmp_path / "dim.png", dim))
    assert image.max() == 8 and image.min() == 4  # 2000/257 = 7.8, 1000/257 = 3.9


def test_grey_gives_three_identical_channels(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = read_image(save(tmp_path / "grey.png", grey))
    assert image.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], grey)


def test_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [200, 210, 220]]]
    rgba[..., 3] = [[0, 255], [128, 1]]
    image = read_image(save(tmp_path / "rgba.png", rgba))
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_palette_image_is_converted_to_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = [255, 0, 0]
    rgb[2:] = [0, 0, 255]
    path = tmp_path / "palette.png"
    Image.fromarray(rgb).quantize(colors=2).save(path)
    assert mode_of(path) == "P"
    np.testing.assert_array_equal(read_image(path), rgb)


def test_bmp_is_exact(tmp_path: Path) -> None:
    rgb = noise_rgb(5, 7)
    np.testing.assert_array_equal(read_image(save(tmp_path / "a.bmp", rgb)), rgb)


def test_jpeg_is_close_and_odd_sizes_are_kept(tmp_path: Path) -> None:
    rgb = np.full((33, 47, 3), [200, 100, 50], dtype=np.uint8)
    image = read_image(save(tmp_path / "a.JPG", rgb, quality=95))
    assert image.shape == (33, 47, 3)
    assert np.abs(image.astype(int) - rgb).max() <= 3


def test_truncated_png_raises_with_path(tmp_path: Path) -> None:
    path = save(tmp_path / "cut.png", noise_rgb(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FlawmapError) as raised:
        read_image(path)
    message = str(raised.value)
    assert str(path) in message and "truncated" in message and "\n" not in message


def test_non_image_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image at all")
    with pytest.raises(FlawmapError, match="not an image file"):
        read_image(path)


def test_missing_file_and_folder_raise(tmp_path: Path) -> None:
    with pytest.raises(FlawmapError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(FlawmapError, match="is a folder"):
        read_image(tmp_path)


def test_float_image_mode_is_unsupported(tmp_path: Path) -> None:
    path = save(tmp_path / "float.tif", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(FlawmapError, match="unsupported image mode 'F'"):
        read_image(path)


def test_mask_binarises_above_threshold(tmp_path: Path) -> None:
    path = save(tmp_path / "m.png", np.array([[0, 1, 127, 128, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(read_mask(path, (1, 5)), [[False, False, False, True, True]])
    np.testing.assert_array_equal(read_mask(path, (1, 5), threshold=0), [[False, True, True, True, True]])


def test_mask_of_any_mode_is_converted_to_grey(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = 255
    mask = read_mask(save(tmp_path / "m.png", rgb), (2, 2))
    np.testing.assert_array_equal(mask, [[True, False], [False, False]])
    deep = save(tmp_path / "deep.png", np.array([[0, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(read_mask(deep, (1, 2)), [[False, True]])


def test_mask_of_wrong_size_names_both_sizes(tmp_path: Path) -> None:
    path = save(tmp_path / "000_mask.png", np.zeros((20, 30), dtype=np.uint8))
    with pytest.raises(FlawmapError) as raised:
        read_mask(path, (90, 60))
    assert str(raised.value) == f"mask {path} is 30x20 but its image is 60x90"


def test_undecodable_mask_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(FlawmapError, match="m.png"):
        read_mask(path, (1, 1))


def test_list_images_sorted_by_suffix_case_insensitively(tmp_path: Path) -> None:
    pixels = noise_rgb(2, 2)
    for name in ("b.PNG", "a.jpg", "c.TiFf", "d.bmp", "._a.png"):
        save(tmp_path / name, pixels)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    assert [path.name for path in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.TiFf", "d.bmp"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FlawmapError, match="no such folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_text("x")
    with pytest.raises(FlawmapError, match="not a folder"):
        list_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlawmapError, match="no image files"):
        list_images(tmp_path / "empty")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A camera JPEG stored landscape with 'rotate 90' in EXIF is read upright (portrait)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "camera.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upright = read_image(path)
    assert upright.shape == (40, 20, 3)
    assert upright[:20, :, 0].mean() > 200 and upright[20:, :, 0].mean() < 50  # red ends up on top


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    """A small file that decodes to 144 megapixels: refused, not decoded into gigabytes."""
    path = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(FlawmapError, match="too large to decode safely") as raised:
        read_image(path)
    assert "\n" not in str(raised.value)


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose header claims ``width x height``."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (100_000, 100_000), (30_000, 20_000)])
def test_zero_size_and_huge_headers_are_one_line_errors(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "header.png"
    path.write_bytes(_png_with_size(*size))
    with pytest.raises(FlawmapError) as raised:
        read_image(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_empty_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(FlawmapError, match="not an image file"):
        read_image(path)


FUZZ_FORMATS = {".png": {}, ".jpg": {"quality": 90}, ".bmp": {}, ".tif": {}, ".tiff": {"compression": "tiff_lzw"}}


@pytest.mark.parametrize("suffix", sorted(FUZZ_FORMATS))
def test_fuzzed_files_decode_or_fail_with_one_line(tmp_path: Path, suffix: str) -> None:
    """Truncations at many lengths, bit flips, random bytes and tiny images of every supported
    format, through the loader of a 64 px model: each file gives a batch of an image of at least
    the 8 x 8 patch grid, or a one-line FlawmapError naming it; nothing else, never a silent score."""
    rng = np.random.default_rng(len(suffix))
    valid = save(tmp_path / f"valid{suffix}", noise_rgb(24, 32), **FUZZ_FORMATS[suffix]).read_bytes()
    tiny = [save(tmp_path / f"tiny{side}{suffix}", noise_rgb(side, side), **FUZZ_FORMATS[suffix]) for side in (1, 7)]
    variants = [valid[:length] for length in np.unique(np.linspace(0, len(valid) - 1, 25).astype(int))]
    for _ in range(25):
        flipped = bytearray(valid)
        for position in rng.integers(0, min(len(valid), 256), size=3):
            flipped[position] ^= 1 << int(rng.integers(8))
        variants.append(bytes(flipped))
    variants += [rng.integers(0, 256, size=int(rng.integers(1, 2000)), dtype=np.uint8).tobytes() for _ in range(10)]
    paths = list(tiny)
    for index, payload in enumerate(variants):
        paths.append(tmp_path / f"fuzz{index:03d}{suffix}")
        paths[-1].write_bytes(payload)
    for path in paths:
        try:
            (batch,) = list(iter_batches([Sample(image_path=path)], 64))
        except FlawmapError as error:
            assert str(path) in str(error) and "\n" not in str(error)
        else:
            assert path not in tiny and batch.images.shape == (1, 3, 64, 64) and min(batch.original_hw[0]) >= 8
