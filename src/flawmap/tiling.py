"""Tiling: images far larger than the network input, scored at their native resolution.

A tiled model (hyper-parameter ``tile_size`` set) never resizes a whole image. Each image is
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

Fitting a tiled model learns from every tile of every training image; its threshold is
calibrated on whole held-out images, tiled and stitched exactly as in prediction (see
:mod:`flawmap.models.calibrators`).

Memory is bounded by one image: tiles are cut and scored ``batch_size`` at a time and blended
into two ``H x W`` float32 accumulators. This module does not import torch, so exported models
(:class:`flawmap.onnx_model.OnnxModel`) tile with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flawmap import postprocess
from flawmap.data.loader import Batch, DecodedImage, to_float_images
from flawmap.errors import FlawmapError

#: Scores a batch of tiles: images (B, 3, S, S) float32 in [0, 1] -> scores (B,), maps (B, S, S).
TileScorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


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

    def boxes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(top, left)`` of every tile of a (padded) ``height x width`` image, row by row."""
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def pad(self, pixels: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 mirror-padded at the bottom and right to at least ``T x T``."""
        height, width = pixels.shape[:2]
        padding = ((0, max(0, self.size - height)), (0, max(0, self.size - width)), (0, 0))
        return np.pad(pixels, padding, mode="symmetric") if padding[0][1] or padding[1][1] else pixels

    def cut(self, padded: np.ndarray, boxes: Iterable[tuple[int, int]]) -> np.ndarray:
        """The tiles at ``boxes`` of a padded ``H x W x 3`` uint8 image, as uint8 ``B x S x S x 3``."""
        tiles = [padded[top : top + self.size, left : left + self.size] for top, left in boxes]
        if self.size != self.network_size:
            target = (self.network_size, self.network_size)
            tiles = [np.asarray(Image.fromarray(tile).resize(target, Image.BILINEAR, reducing_gap=None)) for tile in tiles]
        return np.stack(tiles)

    def weights(self) -> np.ndarray:
        """The blending weight of one tile, ``T x T`` float32 in (0, 1]: the outer product of a
        raised-cosine ramp over ``overlap`` pixels at each end (1 in between) with itself."""
        distance = np.minimum(np.arange(self.size), np.arange(self.size)[::-1]).astype(np.float64)
        ramp = np.ones(self.size) if self.overlap == 0 else 0.5 - 0.5 * np.cos(math.pi * np.minimum((distance + 0.5) / self.overlap, 1.0))
        return np.outer(ramp, ramp).astype(np.float32)

    def score_image(self, pixels: np.ndarray, score_tiles: TileScorer, batch_size: int) -> tuple[float, np.ndarray]:
        """Score one ``H x W x 3`` uint8 image tile by tile.

        Returns the image score (the largest tile score) and the stitched anomaly map
        ``H x W`` float32 at the image's size.
        """
        height, width = pixels.shape[:2]
        padded = self.pad(pixels)
        boxes = self.boxes(*padded.shape[:2])
        stitched = _Stitcher(self, padded.shape[:2])
        best = -math.inf
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            scores, maps = score_tiles(to_float_images(self.cut(padded, chunk)))
            best = max(best, float(np.max(scores)))
            stitched.add(maps, chunk)
        return best, stitched.result()[:height, :width]

    def tile_batches(self, images: Iterable[DecodedImage], batch_size: int) -> Iterator[Batch]:
        """Every tile of every image, in order, packed into batches of ``batch_size`` (across
        images; the last may be smaller). A tile's sample is its image's; its ``original_hw`` is
        ``(S, S)`` and it has no mask. Holds one image and one batch at a time."""
        tiles: list[np.ndarray] = []
        samples = []
        for image in images:
            padded = self.pad(image.pixels)
            for box in self.boxes(*padded.shape[:2]):
                tiles.append(self.cut(padded, [box])[0])
                samples.append(image.sample)
                if len(tiles) == batch_size:
                    yield self._batch(tiles, samples)
                    tiles, samples = [], []
        if tiles:
            yield self._batch(tiles, samples)

    def _batch(self, tiles: list[np.ndarray], samples: list) -> Batch:
        size = (self.network_size, self.network_size)
        return Batch(to_float_images(np.stack(tiles)), samples, [size] * len(tiles), [None] * len(tiles))


def check_tiling(tile_size: int, tile_overlap: int) -> None:
    """Raise FlawmapError unless ``tile_size >= 32`` and ``0 <= tile_overlap <= tile_size / 2``."""
    if tile_size < 32:
        raise FlawmapError(f"tile_size must be at least 32, got {tile_size}")
    if not 0 <= tile_overlap <= tile_size // 2:
        raise FlawmapError(f"tile_overlap must be in [0, tile_size / 2 = {tile_size // 2}], got {tile_overlap}")


class _Stitcher:
    """Weighted sums of tile maps and of their weights over a ``H x W`` image."""

    def __init__(self, tiling: Tiling, shape: tuple[int, int]) -> None:
        self.tiling = tiling
        self.weight = tiling.weights()
        self.sums = np.zeros(shape, dtype=np.float32)
        self.totals = np.zeros(shape, dtype=np.float32)

    def add(self, maps: np.ndarray, boxes: list[tuple[int, int]]) -> None:
        """Blend in tile maps (B, S, S) at ``boxes`` (B of them)."""
        size = self.tiling.size
        for tile_map, (top, left) in zip(maps, boxes):
            native = postprocess.to_original_size(tile_map, (size, size))
            self.sums[top : top + size, left : left + size] += self.weight * native
            self.totals[top : top + size, left : left + size] += self.weight

    def result(self) -> np.ndarray:
        """The blended map ``H x W`` float32 (every pixel is covered by a tile)."""
        return self.sums / self.totals
