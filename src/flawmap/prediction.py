"""Predicting with any fitted model: the pipeline shared by torch models and exported ONNX models.

A :class:`Predictor` turns images into :class:`Prediction` objects: it decodes and batches them
(:func:`flawmap.data.iter_batches`), asks the model for image scores and anomaly maps at the
network size (:meth:`Predictor.score_images`, the only part that differs between a torch model
and an exported one), resizes each map to its image's original size and applies the calibrated
threshold. A tiled model (``tile_size_`` set) scores each image's tiles instead, batched across
images, and stitches their maps at the image's size (:mod:`flawmap.tiling`). ``predict``, ``evaluate``, the overlays of ``flawmap predict`` and the CLI see only
this interface, so they work with either. This module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from flawmap import postprocess
from flawmap.data import Batch, Dataset, Sample, iter_batches, open_dataset, samples_from_paths
from flawmap.data.loader import DecodedImage, as_samples, check_image_side, iter_images
from flawmap.errors import FlawmapError
from flawmap.regions import Region, find_regions
from flawmap.runtime import Runtime
from flawmap.tiling import Tiling

#: What ``fit`` and ``predict`` accept: a path (dataset folder, image folder or image file), a
#: Dataset, a uint8 image array, or a sequence of any of these.
ImageInput = Any


@dataclass(frozen=True)
class Prediction:
    """The result for one image.

    Attributes
    ----------
    sample : Sample
        Which image (its path and, for datasets, its defect type).
    score : float
        Image anomaly score; higher is more anomalous.
    is_anomalous : bool
        ``score > threshold_`` of the model.
    anomaly_map : ndarray of shape (H, W), float32
        Pixel anomaly scores at the image's original size.
    pixel_threshold : float
        The model's pixel threshold ``map_high_``: map values above it form :attr:`regions`.
    """

    sample: Sample
    score: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    pixel_threshold: float

    @cached_property
    def regions(self) -> list[Region]:
        """The map's regions above the pixel threshold, highest peak first (:mod:`flawmap.regions`)."""
        return find_regions(self.anomaly_map, self.pixel_threshold)


class Predictor:
    """A model that can predict. Subclasses provide :meth:`score_images` and these attributes:

    Attributes
    ----------
    method : str
        The method's registered name.
    image_size : int
        ``S``: images (or tiles) are resized to ``S x S`` for the network.
    tile_size_ : int or None
        ``T``: cut images into ``T x T`` tiles at native resolution (:mod:`flawmap.tiling`);
        None (the default of a subclass that does not set it) resizes whole images. For a
        fitted model, the tile size it uses (its hyper-parameter ``tile_size`` resolved).
    tile_overlap : int
        Smallest overlap of neighbouring tiles, in pixels.
    runtime : Runtime
        How the model runs here (batch size, decoding threads, progress, device).
    threshold_ : float
        Image scores above it are anomalous.
    map_low_, map_high_ : float
        Median and calibrated maximum pixel score of normal images: the overlays' colour range,
        and ``map_high_`` the pixel threshold of the regions (:mod:`flawmap.regions`).
    """

    method: str
    image_size: int
    tile_size_: int | None = None
    tile_overlap: int = 0
    runtime: Runtime
    threshold_: float
    map_low_: float
    map_high_: float

    def predict(self, images: ImageInput, *, skip_invalid: bool = False) -> list[Prediction]:
        """Score images: one Prediction (score, flag, map at original size) per image, in order."""
        return [prediction for prediction, _ in self.iter_predictions(prediction_samples(images), skip_invalid=skip_invalid)]

    def iter_predictions(
        self, samples: Sequence[Sample | np.ndarray], *, load_masks: bool = False, skip_invalid: bool = False
    ) -> Iterator[tuple[Prediction, np.ndarray | None]]:
        """Stream ``(Prediction, mask)`` pairs; masks (bool, original size) only with ``load_masks``."""
        self._check_is_fitted()
        for sample, score, anomaly_map, original_hw, mask in self._scored(samples, skip_invalid, "predicting", load_masks):
            full_map = postprocess.to_original_size(anomaly_map, original_hw)
            yield Prediction(sample, score, score > self.threshold_, full_map, self.map_high_), mask

    def score_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) float32 in [0, 1] to image scores (B,) and smoothed maps (B, S, S),
        both float32 numpy."""
        raise NotImplementedError

    def get_params(self) -> dict[str, Any]:
        """The method's hyper-parameters as a plain dict (JSON values)."""
        raise NotImplementedError

    def tiling(self) -> Tiling | None:
        """How this model cuts images into tiles; None when it resizes whole images."""
        if self.tile_size_ is None:
            return None
        return Tiling(self.tile_size_, self.tile_overlap, self.image_size)

    def _check_is_fitted(self) -> None:
        """Raise FlawmapError unless the model can score (an exported model always can)."""

    def set_threshold(self, threshold: float) -> None:
        """Flag image scores above ``threshold`` instead of the calibrated one; FlawmapError for a
        value that is not finite, or below 0 for a model whose normal pixel scores are not (the
        median normal pixel score ``map_low_`` is >= 0): it would flag every image."""
        if not math.isfinite(threshold):
            raise FlawmapError(f"threshold must be a finite number, got {threshold}")
        if threshold < 0.0 <= self.map_low_:
            raise FlawmapError(
                f"threshold {threshold:g} is below 0, and this model's scores are not (median normal pixel score "
                f"{self.map_low_:.4g}): every image would be flagged; its calibrated threshold is {self.threshold_:.4g}"
            )
        self.threshold_ = float(threshold)

    def check_image(self, image: np.ndarray, name: str) -> None:
        """FlawmapError naming ``name`` if the image (H x W x C) is too small for this model, as
        decoding for a prediction would find (cheap: for a server to refuse it before batching)."""
        check_image_side(image.shape[:2], None if self.tiling() is not None else self.image_size, name)

    def _scored(
        self, samples: Sequence[Sample | np.ndarray], skip_invalid: bool, what: str, load_masks: bool = False
    ) -> Iterator[tuple[Sample, float, np.ndarray, tuple[int, int], np.ndarray | None]]:
        """``(sample, score, map, original_hw, mask)`` per image, in order; the map is ``S x S``,
        or for a tiled model the stitched map at the image's size."""
        tiling = self.tiling()
        if tiling is None:
            for batch in self._batches(samples, skip_invalid, what, load_masks=load_masks):
                image_scores, maps = self.score_images(batch.images)
                yield from zip(batch.samples, image_scores.tolist(), maps, batch.original_hw, batch.masks)
            return
        images = self._images(samples, skip_invalid, what, load_masks)
        for image, score, anomaly_map in tiling.score_images(images, self._score_tiles, self.runtime.batch_size):
            yield image.sample, score, anomaly_map, image.original_hw, image.mask

    def _score_tiles(self, tiles: np.ndarray, _images: list[DecodedImage]) -> tuple[np.ndarray, np.ndarray]:
        """A :data:`flawmap.tiling.TileScorer`: tiles are scored as images, whoever they belong to."""
        return self.score_images(tiles)

    def _images(
        self, samples: Sequence[Sample | np.ndarray], skip_invalid: bool, what: str, load_masks: bool = False
    ) -> Iterator[DecodedImage]:
        """The images at their own size, one at a time (for tiling)."""
        return iter_images(
            samples,
            num_workers=self.runtime.num_workers,
            load_masks=load_masks,
            skip_invalid=skip_invalid,
            progress=what if self.runtime.progress else None,
        )

    def _batches(
        self, samples: Sequence[Sample | np.ndarray], skip_invalid: bool, what: str, load_masks: bool = False
    ) -> Iterator[Batch]:
        return iter_batches(
            samples,
            self.image_size,
            batch_size=self.runtime.batch_size,
            num_workers=self.runtime.num_workers,
            load_masks=load_masks,
            skip_invalid=skip_invalid,
            progress=what if self.runtime.progress else None,
        )


def prediction_samples(images: ImageInput) -> list[Sample]:
    """Images to score: files, folders of images, a Dataset (its test split), uint8 arrays or
    PIL images (in-memory samples named by their place in ``images``)."""
    if isinstance(images, Dataset):
        return list(images.test)
    if isinstance(images, (str, Path)):
        return samples_from_paths([images])
    items = [images] if isinstance(images, (np.ndarray, Image.Image)) else list(images)
    if all(isinstance(item, (np.ndarray, Image.Image, Sample)) for item in items):
        return as_samples(items)
    return samples_from_paths(items)


def training_samples(images: ImageInput) -> list[Sample]:
    """Normal training images from any accepted input (dataset folders contribute ``train/good``);
    in-memory images are named by their place among all of them."""
    return as_samples(_training_items(images))


def _training_items(images: ImageInput) -> list[Sample | np.ndarray | Image.Image]:
    if isinstance(images, Dataset):
        return list(images.train)
    if isinstance(images, (str, Path)):
        path = Path(images)
        return list(open_dataset(path).train) if path.is_dir() else samples_from_paths([path])
    if isinstance(images, (np.ndarray, Sample, Image.Image)):
        return [images]
    return [item for group in images for item in _training_items(group)]
