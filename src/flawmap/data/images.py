"""Decoding image and mask files into numpy arrays, with one-line errors for bad files.

Every reader fully decodes the file (Pillow is lazy by default), so a truncated or corrupt file
fails here, with a :class:`~flawmap.errors.FlawmapError` naming it, and not later inside a model.
Images are turned upright by their EXIF orientation (as viewers show them), and a header
announcing more than Pillow's ``MAX_IMAGE_PIXELS`` (a decompression bomb) is refused before decoding.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from flawmap.errors import FlawmapError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File suffixes treated as images when listing folders (matched case-insensitively)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pillow modes holding 16-bit grey levels (16-bit PNG and TIFF open as one of these)."""

_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
"""Pillow modes that convert to 8-bit RGB or grey without losing meaning."""

_UINT16_TO_UINT8 = 257.0
"""65535 / 255: maps the 16-bit range onto the 8-bit range exactly."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` names an image by its suffix; hidden files (``._x.png``) are not images."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file as ``uint8`` RGB of shape ``H x W x 3``.

    Grey and palette images get three identical channels, alpha is dropped (not composited),
    and 16-bit images are scaled by the dtype range (``round(value / 257)``), never per image.

    Raises
    ------
    FlawmapError
        If the file is missing, is not a decodable image, is truncated, or has an unsupported
        pixel mode (such as 32-bit float).
    """
    return np.asarray(open_rgb_image(path))


def open_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file as an RGB Pillow image, as :func:`read_image` does (which returns its
    pixels); the loader resizes it without a round trip through numpy."""
    path = Path(path)
    return _to_rgb(_load(path), path)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode an image file's bytes (an upload, say) exactly as :func:`read_image` decodes the
    file: ``uint8`` RGB of shape ``H x W x 3``. Errors name ``name``.

    Raises
    ------
    FlawmapError
        If the bytes are empty, not a decodable image, truncated, or of an unsupported pixel mode.
    """
    if not data:
        raise FlawmapError(f"{name}: empty (0 bytes)")
    return np.asarray(_to_rgb(_open(io.BytesIO(data), name), name))


def read_mask(path: str | Path, expected_hw: tuple[int, int], threshold: int = 127) -> np.ndarray:
    """Decode a ground-truth mask as ``bool`` of shape ``H x W``: grey level ``> threshold``.

    Any mode is first converted to 8-bit grey. ``expected_hw`` is the ``(height, width)`` of the
    image the mask belongs to; the mask must have exactly that size.

    Raises
    ------
    FlawmapError
        If the file is missing or undecodable, or its size differs from ``expected_hw``.
    """
    path = Path(path)
    grey = np.asarray(_to_8bit(_load(path), path).convert("L"))
    if grey.shape != tuple(expected_hw):
        height, width = grey.shape
        expected_height, expected_width = expected_hw
        raise FlawmapError(
            f"mask {path} is {width}x{height} but its image is {expected_width}x{expected_height}"
        )
    return grey > threshold


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix, see :data:`IMAGE_SUFFIXES`), or
    anywhere below it with ``recursive`` (hidden folders excluded), sorted.

    Raises
    ------
    FlawmapError
        If ``folder`` does not exist, is not a directory, or holds no image files.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FlawmapError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FlawmapError(f"{folder}: not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(
        path for path in candidates
        if path.is_file() and is_image_file(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not images:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        where = "in or below this folder" if recursive else "in this folder (subfolders not searched)"
        raise FlawmapError(f"{folder}: no image files ({suffixes}) {where}")
    return images


def _load(path: Path) -> Image.Image:
    """Open and fully decode ``path``, turning every failure into a one-line FlawmapError."""
    if not path.exists():
        raise FlawmapError(f"{path}: no such file")
    if path.is_dir():
        raise FlawmapError(f"{path}: is a folder, not an image file")
    return _open(path, path)


def _open(source: Path | BinaryIO, name: str | Path) -> Image.Image:
    """Open and fully decode a file or file object; every failure is a one-line FlawmapError naming ``name``."""
    try:
        with Image.open(source) as image:
            _check_pixel_count(image, name)
            image.load()
            upright = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise FlawmapError(f"{name}: image too large to decode safely ({error})") from None
    except PermissionError:
        raise FlawmapError(f"{name}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise FlawmapError(f"{name}: not an image file (unrecognised format)") from None
    except FlawmapError:
        raise
    except Exception:  # Pillow's decoders raise many kinds (struct.error, KeyError, ...) on corrupt data
        raise FlawmapError(f"{name}: cannot decode image (truncated or corrupt)") from None
    if upright.width == 0 or upright.height == 0:
        raise FlawmapError(f"{name}: image has zero size ({upright.width}x{upright.height})")
    return upright


def _check_pixel_count(image: Image.Image, name: str | Path) -> None:
    """Refuse, before decoding, an image whose header announces more than ``MAX_IMAGE_PIXELS``
    (Pillow itself only warns up to twice that)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise FlawmapError(
            f"{name}: image too large to decode safely ({image.width}x{image.height} pixels, limit {limit})"
        )


def _to_rgb(image: Image.Image, name: Path | str) -> Image.Image:
    """``image`` as 8-bit RGB (see :func:`read_image`); errors name ``name``."""
    image = _to_8bit(image, name)
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image, path: Path | str) -> Image.Image:
    """``image`` with 16-bit grey scaled by the dtype range to 8-bit ``L``; 8-bit modes unchanged."""
    if image.mode in _EIGHT_BIT_MODES:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64) / _UINT16_TO_UINT8
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    raise FlawmapError(f"{path}: unsupported image mode {image.mode!r}")
