"""Tiling: images far larger than the network input, scored at their native resolution.

A tiled model never resizes a whole image. Each image is
cut into ``T x T`` tiles (``T = tile_size``) that overlap by at least ``tile_overlap`` pixels:
along each side the tiles start every ``T - tile_overlap`` pixels, and the last one is shifted
inward to end at the border, so every tile is full size and lies inside the image. An image
smaller than a tile along a side is mirror-padded (``d c b a | a b c d | d c b a``) at the
bottom and right to the tile size, and its map is cropped back: padding keeps the native scale
that the model learned, where resizing would change it. Each tile is scored like an image (resized to the network's
``S x S`` only when ``T != S``; by default ``T == S``), and the tile maps are stitched into one
map of the image's size with a separable raised-cosine weight (rising over ``tile_overlap``
pixels at each tile edge, 1 inside), normalised by the summed weights: with the regular overlap
the weights of neighbouring tiles sum to 1 (a partition of unity), and where a shifted border
tile overlaps more, the normalisation keeps the blend a weighted mean. The image score is the
largest tile score, each tile's score being the method's image score of that tile (its own rule,
or the maximum of the tile's smoothed map), so torch models and exported graphs, which both
score tiles, give the same image scores.

Whether a model tiles is its hyper-parameter ``tile_size``: a size, None (resize), or ``"auto"``
(the default), which :func:`choose_tiling` resolves when the model is first fitted: tiles of
``S`` pixels when resizing would shrink the training images' shorter side more than
:data:`AUTO_TILE_FACTOR` times, resizing otherwise. The fitted model keeps the size it uses and
the reason (``tile_size_``, ``tiling_reason_``).

Fitting a tiled model learns from every tile of every training image; its threshold is
calibrated on whole images, tiled and stitched exactly as in prediction (see
:mod:`flawmap.models.calibrators`).

Speed: :meth:`Tiling.score_images` packs the tiles of consecutive images into batches of
``batch_size`` (an image's last tiles share a batch with the next image's first), so the network
and the method's search run once per full batch whatever the tile count of an image; each
batch's maps are weighted in one array operation and added at their places, and the summed
weights, which depend only on the image's size, are computed once per size.

Memory is bounded by a few images: at most ``batch_size`` tiles wait to be scored, and every
image with a tile among them holds its decoded pixels (uint8) and one ``H x W`` float32
accumulator. This module does not import torch, so exported models
(:class:`flawmap.onnx_model.OnnxModel`) tile with the same code.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flawmap import postprocess
from flawmap.data.datasets import Sample
from flawmap.data.loader import Batch, DecodedImage, to_float_images
from flawmap.errors import FlawmapError

#: Scores a batch of tiles: tiles (B, 3, S, S) float32 in [0, 1] and the image each tile was cut
#: from (B of them) -> scores (B,), maps (B, S, S).
TileScorer = Callable[[np.ndarray, list[DecodedImage]], tuple[np.ndarray, np.ndarray]]

#: ``tile_size="auto"`` tiles when resizing would shrink the training images' shorter side more
#: than this factor. On the real categories, all shrunk 3.5x to 4x at 256 px, tiling raised AUPRO
#: on each (docs/tiling.md, the study); below 2x an image is at most 4 largely overlapping tiles,
#: 4x the prediction time for at most a 2x finer view. No category between 1x and 3.5x was
#: measured: the factor itself is the issue's proposal, not a measured optimum.
AUTO_TILE_FACTOR = 2.0


@dataclass(frozen=True)
class Tiling:
    """How a tiled model cuts images.

    Attributes
    ----------
    size : int
        ``T``: native pixels per tile side.
    overlap : int
        Smallest overlap of neighbouring tiles, in pixels; ``0 <= overlap <= T / 2``.
    network_size : int
        ``S``: the network's input size; tiles are resized to ``S x S`` when ``T != S``.
    """

    size: int
    overlap: int
    network_size: int

    def __post_init__(self) -> None:
        check_tiling(self.size, self.overlap)

    def starts(self, length: int) -> list[int]:
        """Tile offsets along one side of ``length`` pixels (``length >= T`` after padding):
        every ``T - overlap`` pixels, the last one shifted inward to end at ``length``."""
        if length <= self.size:
            return [0]
        return [*range(0, length - self.size, self.size - self.overlap), length - self.size]

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        """The size of an ``height x width`` image once padded to at least ``T x T``."""
        return max(height, self.size), max(width, self.size)

    def boxes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(top, left)`` of every tile of a (padded) ``height x width`` image, row by row."""
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def tile_count(self, height: int, width: int) -> int:
        """How many tiles an (unpadded) ``height x width`` image is cut into."""
        padded_height, padded_width = self.padded_shape(height, width)
        return len(self.starts(padded_height)) * len(self.starts(padded_width))

    def pad(self, pixels: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 mirror-padded at the bottom and right to at least ``T x T``."""
        height, width = pixels.shape[:2]
        padding = ((0, max(0, self.size - height)), (0, max(0, self.size - width)), (0, 0))
        return np.pad(pixels, padding, mode="symmetric") if padding[0][1] or padding[1][1] else pixels

    def tile(self, padded: np.ndarray, box: tuple[int, int]) -> np.ndarray:
        """The tile at ``box`` of a padded ``H x W x 3`` uint8 image, as uint8 ``S x S x 3``."""
        top, left = box
        tile = padded[top : top + self.size, left : left + self.size]
        if self.size == self.network_size:
            return tile
        target = (self.network_size, self.network_size)
        return np.asarray(Image.fromarray(tile).resize(target, Image.BILINEAR, reducing_gap=None))

    def weights(self) -> np.ndarray:
        """The blending weight of one tile, ``T x T`` float32 in (0, 1]: the outer product of a
        raised-cosine ramp over ``overlap`` pixels at each end (1 in between) with itself."""
        return _weights(self.size, self.overlap)

    def score_images(self, images: Iterable[DecodedImage], score_tiles: TileScorer, batch_size: int) -> Iterator[tuple[DecodedImage, float, np.ndarray]]:
        """Score images (``pixels`` ``H x W x 3`` uint8 at their own size) tile by tile, the tiles
        of consecutive images batched together ``batch_size`` at a time.

        Yields, per image in order, the image, its score (the largest tile score) and its
        stitched anomaly map ``H x W`` float32.
        """
        waiting: deque[_TiledImage] = deque()  # images with tiles not yet scored, in order
        queue: list[tuple[_TiledImage, tuple[int, int]]] = []  # their tiles not yet scored
        for image in images:
            tiled = _TiledImage(self, image)
            waiting.append(tiled)
            queue += [(tiled, box) for box in tiled.boxes]
            while len(queue) >= batch_size:
                self._score_batch(queue[:batch_size], score_tiles)
                del queue[:batch_size]
                yield from _finished(waiting)
        if queue:
            self._score_batch(queue, score_tiles)
        yield from _finished(waiting)

    def _score_batch(self, queue: list[tuple[_TiledImage, tuple[int, int]]], score_tiles: TileScorer) -> None:
        """Score one batch of tiles (of one or more images) and blend each into its image."""
        owners = [tiled for tiled, _ in queue]
        tiles = to_float_images(np.stack([self.tile(tiled.padded, box) for tiled, box in queue]))
        scores, maps = score_tiles(tiles, [tiled.image for tiled in owners])
        if self.size != self.network_size:
            maps = np.stack([postprocess.to_original_size(tile_map, (self.size, self.size)) for tile_map in maps])
        weighted = maps * self.weights()  # B x T x T, one array operation
        for tiled, (top, left), score, tile_map in zip(owners, (box for _, box in queue), scores.tolist(), weighted):
            tiled.add(score, tile_map, top, left)

    def tile_batches(self, images: Iterable[DecodedImage], batch_size: int) -> Iterator[Batch]:
        """Every tile of every image, in order, packed into batches of ``batch_size`` (across
        images; the last may be smaller). A tile's sample is its image's; its ``original_hw`` is
        ``(S, S)`` and it has no mask. Holds one image and one batch at a time."""
        tiles: list[np.ndarray] = []
        samples = []
        for image in images:
            padded = self.pad(image.pixels)
            for box in self.boxes(*padded.shape[:2]):
                tiles.append(self.tile(padded, box))
                samples.append(image.sample)
                if len(tiles) == batch_size:
                    yield self._batch(tiles, samples)
                    tiles, samples = [], []
        if tiles:
            yield self._batch(tiles, samples)

    def _batch(self, tiles: list[np.ndarray], samples: list) -> Batch:
        size = (self.network_size, self.network_size)
        return Batch(to_float_images(np.stack(tiles)), samples, [size] * len(tiles), [None] * len(tiles))


class _TiledImage:
    """One image being scored: its padded pixels, its tiles, the best tile score so far and the
    weighted sum of its tile maps (``H x W`` float32, at the padded size)."""

    def __init__(self, tiling: Tiling, image: DecodedImage) -> None:
        self.tiling = tiling
        self.image = image
        self.padded = tiling.pad(image.pixels)
        self.boxes = tiling.boxes(*self.padded.shape[:2])
        self.remaining = len(self.boxes)
        self.best = -math.inf
        self.sums = np.zeros(self.padded.shape[:2], dtype=np.float32)

    def add(self, score: float, weighted_map: np.ndarray, top: int, left: int) -> None:
        """Count one scored tile: its score and its weighted map (``T x T``) at ``(top, left)``."""
        size = self.tiling.size
        self.best = max(self.best, score)
        self.sums[top : top + size, left : left + size] += weighted_map
        self.remaining -= 1

    def result(self) -> tuple[float, np.ndarray]:
        """The image score and the blended map ``H x W`` float32 at the image's own size."""
        height, width = self.image.pixels.shape[:2]
        blended = self.sums * _inverse_weight_totals(self.tiling, self.padded.shape[:2])
        return self.best, blended[:height, :width]


def _finished(waiting: deque[_TiledImage]) -> Iterator[tuple[DecodedImage, float, np.ndarray]]:
    """Pop and yield the leading images of ``waiting`` whose tiles are all scored."""
    while waiting and waiting[0].remaining == 0:
        tiled = waiting.popleft()
        yield (tiled.image, *tiled.result())


@functools.lru_cache(maxsize=8)
def _weights(size: int, overlap: int) -> np.ndarray:
    """:meth:`Tiling.weights` (computed once per tiling)."""
    distance = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float64)
    ramp = np.ones(size) if overlap == 0 else 0.5 - 0.5 * np.cos(math.pi * np.minimum((distance + 0.5) / overlap, 1.0))
    weights = np.outer(ramp, ramp).astype(np.float32)
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=8)
def _inverse_weight_totals(tiling: Tiling, shape: tuple[int, int]) -> np.ndarray:
    """One over the summed tile weights at each pixel of a padded image of ``shape`` (every
    pixel is covered by a tile); they depend only on the shape, so once per image size."""
    totals = np.zeros(shape, dtype=np.float32)
    for top, left in tiling.boxes(*shape):
        totals[top : top + tiling.size, left : left + tiling.size] += tiling.weights()
    inverse = 1.0 / totals
    inverse.flags.writeable = False
    return inverse


def check_tiling(tile_size: int, tile_overlap: int) -> None:
    """Raise FlawmapError unless ``tile_size >= 32`` and ``0 <= tile_overlap <= tile_size / 2``."""
    if tile_size < 32:
        raise FlawmapError(f"tile_size must be at least 32, got {tile_size}")
    if not 0 <= tile_overlap <= tile_size // 2:
        raise FlawmapError(f"tile_overlap must be in [0, tile_size / 2 = {tile_size // 2}], got {tile_overlap}")


def check_tiling_params(tile_size: int | str | None, tile_overlap: int) -> None:
    """Raise FlawmapError unless the hyper-parameter ``tile_size`` is a size, ``"auto"`` or None,
    and a size goes with a valid ``tile_overlap`` (for ``"auto"``, checked if the fit tiles)."""
    if isinstance(tile_size, str) and tile_size != "auto":
        raise FlawmapError(f"tile_size must be a number of pixels, 'auto' or None, got {tile_size!r}")
    if isinstance(tile_size, int):
        check_tiling(tile_size, tile_overlap)


def choose_tiling(tile_size: int | str | None, samples: Sequence[Sample], image_size: int) -> tuple[int | None, str]:
    """The tile size a model fitted on ``samples`` uses (None: resize) and why, in one line.

    A size or None is used as given. ``"auto"`` tiles by ``image_size`` when the median shorter
    side of the training images is more than :data:`AUTO_TILE_FACTOR` times ``image_size`` (the
    median: with images of mixed sizes the decision follows the typical one, and a tiled model
    scores any size, padding the smaller ones), and resizes otherwise. Only image headers are
    read; unreadable images are left to the fit to report.
    """
    if tile_size != "auto":
        return tile_size, "resized whole (tile_size=None as given)" if tile_size is None else f"tiles of {tile_size} px as given"
    sides = [side for side in map(_shorter_side, samples) if side is not None]
    if not sides:
        return None, "auto: resized whole (no readable image size)"
    side = int(statistics.median(sides))
    spread = "" if min(sides) == max(sides) else f", median of {len(sides)} sizes from {min(sides)} to {max(sides)} px"
    ratio = side / image_size
    if ratio > AUTO_TILE_FACTOR:
        return image_size, (
            f"auto: tiles of {image_size} px, as resizing would shrink the images' shorter side ({side} px{spread}) "
            f"{ratio:.1f}x, more than {AUTO_TILE_FACTOR:g}x"
        )
    return None, (
        f"auto: resized whole, as the images' shorter side ({side} px{spread}) is at most {AUTO_TILE_FACTOR:g}x "
        f"the network input ({image_size} px)"
    )


def _shorter_side(sample: Sample) -> int | None:
    """The shorter side of an in-memory image, or of an image file from its header; None if unreadable."""
    if sample.pixels is not None:
        return min(sample.pixels.shape[:2])
    try:
        with Image.open(sample.image_path) as image:
            return min(image.size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
