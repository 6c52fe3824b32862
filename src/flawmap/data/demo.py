"""A small, deterministic, MVTec-layout demo dataset made from scikit-image's texture photos.

Normal images are random crops of a real texture photo (with flips and brightness jitter),
tinted per category. Defect images are normal images with one drawn defect; their masks hold
exactly the pixels the defect changed. The same seed gives byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from scipy.spatial import cKDTree

from flawmap.errors import FlawmapError

TEXTURES: dict[str, tuple[Callable[[], np.ndarray], tuple[float, float, float]]] = {
    "brick": (skimage.data.brick, (1.0, 0.72, 0.58)),
    "gravel": (skimage.data.gravel, (0.92, 0.9, 0.85)),
    "grass": (skimage.data.grass, (0.62, 0.95, 0.5)),
    "moon": (skimage.data.moon, (0.9, 0.88, 0.8)),
}
"""Category name -> (grey 512 x 512 source photo, RGB tint). A category's seed offset is its index here."""

_CROP_FRACTION = 0.6
"""Side of the random crop, as a fraction of the source photo's side."""

_BRIGHTNESS_JITTER = 0.08
"""Normal images are scaled in brightness by a factor in ``1 +- this``."""

_LEVEL_LOW, _LEVEL_HIGH = 20, 235
"""Clean pixel levels stay in this range, so no defect saturates into an unchanged pixel."""

_MIN_ALPHA = 0.2
"""Defect coverage below this is dropped, so every covered pixel changes visibly."""

_PNG_COMPRESS_LEVEL = 1
"""zlib level for the PNG files: photos barely compress, and level 6 is several times slower."""


def make_demo_data(
    out_dir: str | Path,
    categories: Sequence[str] = ("brick", "gravel", "moon"),
    image_size: int = 256,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 5,
    seed: int = 0,
) -> list[Path]:
    """Write one MVTec-layout folder per category under ``out_dir`` and return their paths.

    Each folder holds ``train/good/NNN.png``, ``test/good/NNN.png``, ``test/<defect>/NNN.png``
    and ``ground_truth/<defect>/NNN_mask.png`` (0/255), with ``n_test_defect`` images per
    defect type in :data:`DEFECT_TYPES`. Images are RGB ``image_size x image_size``.

    Raises
    ------
    FlawmapError
        If a category is unknown, a count or the size is too small, or a category folder
        already exists and is not empty (nothing is overwritten).
    """
    _check_arguments(categories, image_size, n_train, n_test_good, n_test_defect)
    folders = []
    for category in categories:
        folder = Path(out_dir) / category
        if folder.exists() and any(folder.iterdir()):
            raise FlawmapError(f"{folder}: already exists and is not empty; choose another folder")
        rng = np.random.default_rng(seed + list(TEXTURES).index(category))
        _write_category(folder, category, rng, image_size, (n_train, n_test_good, n_test_defect))
        folders.append(folder)
    return folders


def normal_image(
    texture: np.ndarray, tint: Sequence[float], rng: np.random.Generator, image_size: int
) -> np.ndarray:
    """A random flipped, jittered, tinted crop of the grey ``texture``: ``uint8 S x S x 3``.

    Levels stay within ``[20, 235]`` so that every defect can change every pixel it covers.
    """
    side = int(_CROP_FRACTION * min(texture.shape))
    top = rng.integers(0, texture.shape[0] - side + 1)
    left = rng.integers(0, texture.shape[1] - side + 1)
    crop = texture[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (image_size, image_size), Image.BILINEAR, reducing_gap=None
    )
    brightness = rng.uniform(1 - _BRIGHTNESS_JITTER, 1 + _BRIGHTNESS_JITTER)
    grey = np.clip(np.asarray(resized) / 255.0 * brightness, 0.0, 1.0)
    levels = _LEVEL_LOW + (_LEVEL_HIGH - _LEVEL_LOW) * grey[:, :, None] * np.asarray(tint)
    return np.rint(levels).astype(np.uint8)


def draw_defect(
    clean: np.ndarray, defect_type: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``defect_type`` into a copy of ``clean`` (``uint8 H x W x 3``).

    Returns the defective image (``uint8 H x W x 3``) and the drawn shape (``bool H x W``), which
    is exactly the set of pixels that differ from ``clean``.
    """
    coverage, shift = _DRAWERS[defect_type](clean, rng)
    coverage = np.where(coverage >= _MIN_ALPHA, coverage, 0.0)
    image = np.clip(np.rint(clean + coverage[:, :, None] * shift), 0, 255).astype(np.uint8)
    return image, coverage > 0


def _check_arguments(
    categories: Sequence[str], image_size: int, n_train: int, n_test_good: int, n_test_defect: int
) -> None:
    """Raise FlawmapError for an unknown category or a size or count that is too small."""
    for category in categories:
        if category not in TEXTURES:
            raise FlawmapError(f"unknown demo category {category!r}; choose from: {', '.join(TEXTURES)}")
    if image_size < 32:
        raise FlawmapError(f"demo image_size must be at least 32, got {image_size}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise FlawmapError("demo counts must be >= 0, with at least one training image")


def _write_category(
    folder: Path, category: str, rng: np.random.Generator, image_size: int, counts: tuple[int, int, int]
) -> None:
    """Write one category's train, test and ground-truth files (``counts``: train, good, per defect)."""
    load_texture, tint = TEXTURES[category]
    texture = load_texture()
    n_train, n_test_good, n_test_defect = counts
    for split, count in (("train", n_train), ("test", n_test_good)):
        for index in range(count):
            image = normal_image(texture, tint, rng, image_size)
            _write_png(folder / split / "good" / f"{index:03d}.png", image)
    for defect_type in DEFECT_TYPES:
        for index in range(n_test_defect):
            image, mask = draw_defect(normal_image(texture, tint, rng, image_size), defect_type, rng)
            _write_png(folder / "test" / defect_type / f"{index:03d}.png", image)
            mask_path = folder / "ground_truth" / defect_type / f"{index:03d}_mask.png"
            _write_png(mask_path, mask.astype(np.uint8) * 255)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Save ``uint8`` pixels (``H x W`` or ``H x W x 3``) as a PNG without metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


def _pixel_grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of every pixel, each ``float H x W``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return rows.astype(np.float64), cols.astype(np.float64)


def _line_coverage(points: np.ndarray, half_width: float, shape: tuple[int, ...]) -> np.ndarray:
    """Anti-aliased coverage (``float H x W`` in [0, 1]) of a line through dense ``points`` (``N x 2``)."""
    rows, cols = _pixel_grid(shape)
    pixels = np.stack([rows.ravel(), cols.ravel()], axis=1)
    distance, _ = cKDTree(points).query(pixels, distance_upper_bound=half_width + 1.0)
    coverage = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    return coverage.reshape(shape[:2])


def _random_segment(
    rng: np.random.Generator, size: int, length_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (row, col) of a random segment whose length is a fraction of ``size``."""
    start = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(*length_range) * size
    end = np.clip(start + length * np.array([np.sin(angle), np.cos(angle)]), 0.05 * size, 0.95 * size)
    return start, end


def _dense_curve(start: np.ndarray, control: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Points every quarter pixel or so along a quadratic Bezier curve: ``N x 2``."""
    count = int(4 * (np.linalg.norm(control - start) + np.linalg.norm(end - control))) + 2
    t = np.linspace(0.0, 1.0, count)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def _blob_radius(rng: np.random.Generator, base_radius: float, angle: np.ndarray) -> np.ndarray:
    """An irregular closed outline: radius ``H x W`` as a function of the polar ``angle``."""
    radius = np.full_like(angle, base_radius)
    for harmonic in (2, 3, 5):
        amplitude, phase = rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi)
        radius += base_radius * amplitude * np.sin(harmonic * angle + phase)
    return radius


def _random_blob(
    rng: np.random.Generator, shape: tuple[int, ...], radius_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from a random centre and the irregular blob radius there, each ``float H x W``."""
    rows, cols = _pixel_grid(shape)
    centre = rng.uniform(0.2, 0.8, 2) * shape[0]
    distance = np.hypot(rows - centre[0], cols - centre[1])
    angle = np.arctan2(rows - centre[0], cols - centre[1])
    return distance, _blob_radius(rng, rng.uniform(*radius_range) * shape[0], angle)


def _colour_shift(direction: np.ndarray, magnitude: float) -> np.ndarray:
    """An RGB shift along ``direction`` whose largest channel is ``magnitude`` levels."""
    return magnitude * direction / np.abs(direction).max()


def _draw_scratch(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved bright or dark line, a few pixels wide."""
    size = clean.shape[0]
    start, end = _random_segment(rng, size, (0.3, 0.6))
    normal = np.array([end[1] - start[1], start[0] - end[0]])
    control = (start + end) / 2 + rng.uniform(-0.3, 0.3) * normal
    half_width = max(0.75, rng.uniform(0.01, 0.018) * size)
    coverage = _line_coverage(_dense_curve(start, control, end), half_width, clean.shape)
    return coverage, np.full(3, rng.choice([-1.0, 1.0]) * rng.uniform(60, 90))


def _draw_cut(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A straight dark gap, as if a piece were missing: pixels darkened to 40 % of their level."""
    start, end = _random_segment(rng, clean.shape[0], (0.2, 0.4))
    half_width = max(1.0, rng.uniform(0.015, 0.025) * clean.shape[0])
    coverage = _line_coverage(_dense_curve(start, (start + end) / 2, end), half_width, clean.shape)
    return coverage, -0.6 * clean.astype(np.float64)


def _draw_spot(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A filled irregular blob of a different intensity and colour, with an anti-aliased edge."""
    distance, radius = _random_blob(rng, clean.shape, (0.04, 0.08))
    coverage = np.clip(radius - distance + 0.5, 0.0, 1.0)
    direction = rng.choice([-1.0, 1.0]) + 0.3 * rng.normal(size=3)
    return coverage, _colour_shift(direction, rng.uniform(45, 75))


def _draw_stain(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A larger soft-edged region blended towards a random colour."""
    distance, radius = _random_blob(rng, clean.shape, (0.08, 0.14))
    coverage = rng.uniform(0.6, 0.9) * np.clip(1.0 - (distance / radius) ** 2, 0.0, 1.0) ** 0.7
    return coverage, _colour_shift(rng.normal(size=3), rng.uniform(60, 80))


_DRAWERS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "cut": _draw_cut,
    "scratch": _draw_scratch,
    "spot": _draw_spot,
    "stain": _draw_stain,
}
"""Defect type -> function returning (coverage ``float H x W`` in [0, 1], RGB shift at full coverage)."""

DEFECT_TYPES = tuple(_DRAWERS)
"""Defect types drawn into every category."""
