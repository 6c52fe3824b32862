"""How a fit gets out-of-sample scores of normal images for the threshold: one strategy object each.

The threshold is a quantile of normal images' scores (:mod:`flawmap.calibration`), so those
scores must come from images the model did not learn from, or they are too low and the
threshold flags more than ``false_alarm_rate`` of normal images. A fit makes one
:class:`Calibrator` (the model's ``_calibrator_class()``: from its traits and tiling) and asks it,
in order: which samples to learn from (:meth:`Calibrator.split`), to watch every embedded
training batch (:meth:`Calibrator.observe`), and, after learning, to add the out-of-sample
normal scores (:meth:`Calibrator.add_normal_scores`). Three strategies:

- :class:`CrossFit` (methods whose traits cross-fit): nothing is held out. After learning, the
  fit's training images are scored by the fitted model without what it learned from each of them
  (the method's ``_left_out_scores``: a memory bank without that image's rows, Gaussians without
  its moments), from the features of the learning pass (kept when they fit in
  :data:`CROSS_FIT_CACHE_BYTES`) or embedded once more. Training images are numbered 0, 1, ... in
  the order their features reach ``_learn``, across fits (a fit's first image is number
  ``n_train_images_`` before it). A fit of more than :data:`CROSS_FIT_MAX_IMAGES` images scores a
  seeded-hash sample of that many. The scores of earlier fits are kept as they were computed
  (against a smaller model, so they err on the high side).
- :class:`HoldOut` (methods that train networks on their fit images, whose networks have seen
  every image leave-one-out would score): a share ``calibration_fraction`` of the normal images is
  held out, chosen by a seeded hash of each image's identity (so the same images are held out
  whether they arrive in one fit or several); the held-out images of every fit are kept in the
  model (``uint8``, at the network size) and all of them are scored again after every fit (the
  method's ``_held_out_scores``: as in prediction, unless its density model took them in too and
  scores them leave-one-out, as FYD's Gaussians do).
- Tiled models (:mod:`flawmap.tiling`: each tile reaches ``_learn`` as one image and
  ``n_train_images_`` counts tiles) learn from tiles but flag images, so their normal scores are
  *whole-image* scores, each image cut, scored and stitched as in prediction.
  :class:`TiledCrossFit` (methods that cross-fit) scores each (sampled) training image with *all
  of its tiles* left out: its neighbouring tiles overlap it and hold the same pixels, so leaving
  one tile out would leave near-copies of its patches in the model and bias the scores low; the
  method gets, for every tile, the range of its image's tiles' numbers (``_left_out_scores``
  with ``image_ids`` of shape (B, 2): first and end, exclusive). Holding out instead left 3 of
  screw's 40 images to place a quantile (docs/tiling.md). :class:`TiledHoldOut` (the others)
  holds out ``calibration_fraction`` of the images (by the same hash) and scores them whole after
  learning. Its held-out images are not kept (they may be huge): each fit scores its own, and the
  scores of earlier fits are kept.

``calibration_images_`` are the held-out images, or for the other two strategies the first
:data:`KEPT_CALIBRATION_IMAGES` training images (tiles) (kept for checks such as the export
parity test). ``calibrate`` (new normal images after the fit) replaces the normal scores of any
strategy; :data:`CALIBRATION_STATE` is what it changes. Both fits and ``calibrate`` count an image
given twice once, and ``calibrate`` refuses the model's training images
(:func:`distinct_training_samples`, :func:`distinct_calibration_samples`).
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from flawmap.calibration import CalibrationWarning, check_calibration_count
from flawmap.data import Batch, Sample
from flawmap.data.digests import DuplicateImageWarning, distinct_images, name_some
from flawmap.data.loader import DecodedImage, InvalidImageWarning
from flawmap.errors import FlawmapError
from flawmap.runtime import progress_bar

if TYPE_CHECKING:
    from flawmap.models.base import AnomalyModel

#: Training images (tiles) a cross-fitted or tiled model keeps as ``calibration_images_`` (for checks).
KEPT_CALIBRATION_IMAGES = 8
#: The features of the training images a fit scores leave-one-out are kept (on the CPU) from the
#: learning pass for the cross-fitting pass when all of them fit in this size; otherwise those
#: images are embedded a second time.
CROSS_FIT_CACHE_BYTES = 1 << 30
#: Training images of one fit scored leave-one-out, at most (a seeded-hash sample of them when a
#: fit has more). 256 normal scores put the empirical quantile at the default 5% false-alarm rate
#: on 12 exceedances and the 1% rate on the fitted tail; and a bounded number of images keeps the
#: cross-fitting pass (each image against a bank that grows with the training set) linear in the
#: number of training images instead of quadratic.
CROSS_FIT_MAX_IMAGES = 256
#: Progress bars of a fit's calibration pass: training images scored leave-one-out, or the
#: held-out images scored by the fitted model.
LEFT_OUT_PROGRESS = "calibrating: leave-one-out"
HELD_OUT_PROGRESS = "calibrating: held-out images"
#: What a calibration changes in a model (saved as one entry of ``calibration_history_``).
CALIBRATION_STATE = (
    "false_alarm_rate", "threshold_", "map_low_", "map_high_", "calibration_",
    "calibration_scores_", "calibration_map_maxima_", "calibration_map_medians_",
)


class Calibrator:
    """One fit's way to out-of-sample normal scores (module docstring).

    ``n_embedded`` counts the images (tiles, for a tiled model) whose features reached ``_learn``.
    """

    #: Whether ``calibration_fraction`` of the normal images is held out (so that it matters).
    holds_out: ClassVar[bool] = True

    def __init__(self, model: AnomalyModel, first: bool, skip_invalid: bool) -> None:
        self.model = model
        self.first = first
        self.skip_invalid = skip_invalid
        self.n_embedded = 0

    @classmethod
    def describe(cls, n_images: int) -> str:
        """Where the normal scores of a fit calibrated this way come from (``Calibration.source``)."""
        raise NotImplementedError

    def split(self, samples: list[Sample]) -> list[Sample]:
        """The samples to learn from (the others are held out)."""
        return samples

    def observe(self, batch: Batch, features: Any) -> None:
        """See one embedded training batch (its features, as ``_learn`` gets them)."""
        self.n_embedded += len(batch.samples)

    def add_normal_scores(self) -> None:
        """After learning: add the out-of-sample normal scores to the model's."""
        raise NotImplementedError

    def _keep_images(self, images: np.ndarray) -> None:
        """Add the first of ``images`` (uint8 B x 3 x S x S) to the model's ``calibration_images_``,
        up to :data:`KEPT_CALIBRATION_IMAGES` in all."""
        room = KEPT_CALIBRATION_IMAGES - self.model.calibration_images_.shape[0]
        if room > 0 and len(images):
            self.model.calibration_images_ = torch.cat([self.model.calibration_images_, torch.from_numpy(images[:room])])


class _LeaveOut(Calibrator):
    """What the two cross-fitting strategies share: nothing is held out; ``numbers`` maps each
    embedded image's source (:attr:`Sample.source`) to its training number (for a tiled model,
    the number of the image's *last* tile: its tiles are numbered consecutively); ``scored`` are
    the sources of the images to score left out (:func:`cross_fit_sources`)."""

    holds_out = False

    def __init__(self, model: AnomalyModel, first: bool, skip_invalid: bool) -> None:
        super().__init__(model, first, skip_invalid)
        self.first_number = model.n_train_images_
        self.numbers: dict[str, int] = {}
        self.samples: list[Sample] = []
        self.scored: set[str] = set()

    def split(self, samples: list[Sample]) -> list[Sample]:
        self.samples = samples
        self.scored = cross_fit_sources(samples, self.model.random_state)
        return samples

    def observe(self, batch: Batch, features: Any) -> None:
        for offset, sample in enumerate(batch.samples):
            self.numbers[sample.source] = self.first_number + self.n_embedded + offset
        super().observe(batch, features)


class CrossFit(_LeaveOut):
    """Score the fit's (sampled) training images leave-one-out after learning.

    ``capacity`` is the number of images to score (``scored``). When the features of all ``capacity`` images fit in :data:`CROSS_FIT_CACHE_BYTES`
    (known at the first batch), the learning pass keeps them on the CPU: ``features`` holds the
    first ``n_kept`` of them in learning order (the scorer's features with ``capacity`` rows
    each), ``image_ids`` (capacity,) their numbers and ``images`` the first of them as uint8
    (n x 3 x S x S, at most :data:`KEPT_CALIBRATION_IMAGES`); otherwise ``features`` stays None
    and they are embedded again. Rows are copied into buffers allocated once for all of them: a
    slice kept per batch, between each batch's large temporaries, fragmented the C heap so that a
    fit's resident memory grew with its number of images.
    """

    def __init__(self, model: AnomalyModel, first: bool, skip_invalid: bool) -> None:
        super().__init__(model, first, skip_invalid)
        self.capacity = 0
        self.features: Any = None
        self.image_ids = torch.empty(0, dtype=torch.long)
        self.images: np.ndarray | None = None
        self.n_kept = 0
        self._caching = True

    @classmethod
    def describe(cls, n_images: int) -> str:
        return f"cross-fit, each training image scored leave-one-out ({n_images} images)"

    def split(self, samples: list[Sample]) -> list[Sample]:
        super().split(samples)
        self.capacity = len(self.scored)
        self.image_ids = torch.empty(self.capacity, dtype=torch.long)
        return samples

    def observe(self, batch: Batch, features: Any) -> None:
        super().observe(batch, features)
        sources = [sample.source for sample in batch.samples]
        rows = [i for i, source in enumerate(sources) if source in self.scored]
        if not self._caching or not rows:
            return
        if self.features is None:
            self.features = self._allocate(features)
            if self.features is None:  # too large: the cross-fitting pass embeds them again
                self._caching = False
                return
        index, end = torch.tensor(rows), self.n_kept + len(rows)
        for kept, new in zip(tensors_in(self.features), tensors_in(features)):
            kept[self.n_kept : end].copy_(new[index.to(new.device)])
        self.image_ids[self.n_kept : end] = torch.tensor([self.numbers[sources[i]] for i in rows])
        if self.n_kept < KEPT_CALIBRATION_IMAGES:
            first = to_uint8(batch.images[rows][: KEPT_CALIBRATION_IMAGES - self.n_kept])
            self.images = first if self.images is None else np.concatenate([self.images, first])
        self.n_kept = end

    def kept_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Any, np.ndarray]]:
        """``(image numbers (b,), features on the CPU, their uint8 images among the first kept)``
        of the kept images, ``batch_size`` at a time (grouped as when they are embedded again)."""
        for start in range(0, self.n_kept, batch_size):
            rows = slice(start, min(start + batch_size, self.n_kept))
            yield self.image_ids[rows], map_tensors(operator.itemgetter(rows), self.features), self.images[rows]

    def add_normal_scores(self) -> None:
        """Add the leave-one-out scores of this fit's (sampled) training images: from the features
        kept by the learning pass, or by embedding those images again (images skipped while
        learning are skipped again, silently: they were reported)."""
        model = self.model
        device = model.runtime.torch_device
        if self.features is not None:
            with progress_bar(model._progress(LEFT_OUT_PROGRESS), total=self.n_kept, unit="img") as bar:
                for image_ids, features, images in self.kept_batches(model.runtime.batch_size):
                    self._add_left_out_batch(image_ids, map_tensors(lambda t: t.to(device), features), images)
                    bar.update(len(image_ids))
            return
        scored = [sample for sample in self.samples if sample.source in self.scored]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InvalidImageWarning)
            for batch in model._batches(scored, self.skip_invalid, LEFT_OUT_PROGRESS):
                image_ids = torch.tensor([self.numbers[sample.source] for sample in batch.samples])
                with torch.inference_mode():
                    features = model.scorer_.embed(torch.from_numpy(batch.images).to(device))
                self._add_left_out_batch(image_ids, features, to_uint8(batch.images))

    def _add_left_out_batch(self, image_ids: torch.Tensor, features: Any, images: np.ndarray) -> None:
        """Score one batch of training images leave-one-out; keep the first images (uint8
        B x 3 x S x S) as ``calibration_images_``."""
        with torch.inference_mode():
            image_scores, maps = self.model._postprocess(self.model._left_out_scores(features, image_ids))
        self.model._add_normal_scores(zip(image_scores.tolist(), maps))
        self._keep_images(images)

    def _allocate(self, features: Any) -> Any:
        """CPU buffers with ``capacity`` rows shaped like each of ``features``' rows; None when
        they would exceed :data:`CROSS_FIT_CACHE_BYTES`."""
        row_bytes = sum(t[0].numel() * t.element_size() for t in tensors_in(features))
        if self.capacity * row_bytes > CROSS_FIT_CACHE_BYTES:
            return None
        return map_tensors(lambda t: torch.empty(self.capacity, *t.shape[1:], dtype=t.dtype), features)


class HoldOut(Calibrator):
    """Hold out about ``calibration_fraction`` of the images (decoded, uint8 3 x S x S, in
    ``held_out``); after learning, keep them with those of earlier fits and score them all."""

    def __init__(self, model: AnomalyModel, first: bool, skip_invalid: bool) -> None:
        super().__init__(model, first, skip_invalid)
        self.held_out: list[np.ndarray] = []

    @classmethod
    def describe(cls, n_images: int) -> str:
        return f"held-out normal images ({n_images} images)"

    def split(self, samples: list[Sample]) -> list[Sample]:
        """A first fit holds out at least one valid image (with ``skip_invalid``, the next images
        by hash replace unreadable ones) and keeps at least one to learn from."""
        order, n_held = held_out_order(samples, self.model, self.first)
        held = order[:n_held]
        while True:
            self.held_out = [image for batch in self.model._batches([samples[i] for i in held], self.skip_invalid, "holding out")
                             for image in to_uint8(batch.images)]
            if self.held_out or not self.first or len(held) >= len(samples) - 1:
                break
            held = order[: len(held) + 1]  # every held-out image was unreadable: try the next one
        return _without(samples, held)

    def add_normal_scores(self) -> None:
        """Add this fit's held-out images and score every held-out image again (the model changed)."""
        model = self.model
        if self.held_out:
            model.calibration_images_ = torch.cat([model.calibration_images_, torch.from_numpy(np.stack(self.held_out))])
        if model.calibration_images_.shape[0] == 0:
            raise FlawmapError("no valid calibration image left: every held-out image was skipped")
        model.calibration_scores_, model.calibration_map_maxima_, model.calibration_map_medians_ = [], [], []
        n_images, batch_size = model.calibration_images_.shape[0], model.runtime.batch_size
        with progress_bar(model._progress(HELD_OUT_PROGRESS), total=n_images, unit="img") as bar:
            for start in range(0, n_images, batch_size):
                images = model.calibration_images_[start : start + batch_size].float().div_(255.0)
                image_scores, maps = model._held_out_scores(images)
                model._add_normal_scores(zip(image_scores.tolist(), maps))
                bar.update(images.shape[0])


class TiledCrossFit(_LeaveOut):
    """Tiled models of methods that cross-fit: after learning, score each (sampled) training image
    whole, tiled and stitched as in prediction, with all of its tiles left out (module docstring):
    an image numbered ``last`` (``numbers``) has tiles ``last - n_tiles + 1 .. last``.
    """

    @classmethod
    def describe(cls, n_images: int) -> str:
        return f"cross-fit, each training image tiled and scored whole with all its tiles left out ({n_images} images)"

    def observe(self, batch: Batch, features: Any) -> None:
        super().observe(batch, features)
        self._keep_images(to_uint8(batch.images[:KEPT_CALIBRATION_IMAGES]))

    def add_normal_scores(self) -> None:
        """Images skipped while learning are skipped again (they were reported)."""
        model, tiling, scored = self.model, self.model.tiling(), self.scored

        def score_left_out(tiles: np.ndarray, images: list[DecodedImage]) -> tuple[np.ndarray, np.ndarray]:
            ends = torch.tensor([self.numbers[image.sample.source] + 1 for image in images])
            counts = torch.tensor([tiling.tile_count(*image.original_hw) for image in images])
            with torch.inference_mode():
                features = model.scorer_.embed(torch.from_numpy(tiles).to(model.runtime.torch_device))
                return model._postprocess(model._left_out_scores(features, torch.stack([ends - counts, ends], dim=1)))

        decoded = model._images(self.samples, self.skip_invalid, LEFT_OUT_PROGRESS)
        wanted = (image for image in decoded if image.sample.source in scored and image.sample.source in self.numbers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InvalidImageWarning)
            model._add_normal_scores(
                (score, anomaly_map) for _, score, anomaly_map in tiling.score_images(wanted, score_left_out, model.runtime.batch_size)
            )


class TiledHoldOut(Calibrator):
    """Hold out about ``calibration_fraction`` of the images (the samples, in ``held_out``) and
    score them whole, tiled and stitched as in prediction, after learning."""

    def __init__(self, model: AnomalyModel, first: bool, skip_invalid: bool) -> None:
        super().__init__(model, first, skip_invalid)
        self.held_out: list[Sample] = []

    @classmethod
    def describe(cls, n_images: int) -> str:
        return f"held-out normal images, tiled and scored whole ({n_images} images)"

    def split(self, samples: list[Sample]) -> list[Sample]:
        order, n_held = held_out_order(samples, self.model, self.first)
        self.held_out = [samples[i] for i in order[:n_held]]
        return _without(samples, order[:n_held])

    def observe(self, batch: Batch, features: Any) -> None:
        super().observe(batch, features)
        self._keep_images(to_uint8(batch.images[:KEPT_CALIBRATION_IMAGES]))

    def add_normal_scores(self) -> None:
        scored = self.model._scored(self.held_out, self.skip_invalid, HELD_OUT_PROGRESS)
        self.model._add_normal_scores((score, anomaly_map) for _, score, anomaly_map, _, _ in scored)
        if not self.model.calibration_scores_:
            raise FlawmapError("no valid calibration image left: every held-out image was skipped")


def distinct_training_samples(model: AnomalyModel, samples: list[Sample], first: bool) -> tuple[list[Sample], list[str]]:
    """``samples`` with each content once, and not one an earlier fit of ``model`` learned; their digests.
    Warns (:class:`~flawmap.data.digests.DuplicateImageWarning`) naming the dropped ones."""
    known = set() if first or model.train_digests_ is None else set(model.train_digests_)
    kept, digests, dropped = distinct_images(samples, known)
    if dropped:
        warnings.warn(
            f"{len(dropped)} training image{'s' if len(dropped) > 1 else ''} given again counted once: {name_some(dropped)}",
            DuplicateImageWarning, stacklevel=3,
        )
    return kept, digests

def distinct_calibration_samples(model: AnomalyModel, samples: list[Sample], allow_training_images: bool) -> list[Sample]:
    """``samples`` with each content once, for :meth:`AnomalyModel.calibrate`; FlawmapError for
    training images of ``model`` (unless allowed: recognised by content, :mod:`flawmap.data.digests`)
    or fewer than MIN_CALIBRATION_IMAGES distinct ones."""
    kept, digests, dropped = distinct_images(samples)
    if dropped:
        warnings.warn(f"calibration images given again counted once: {name_some(dropped)}", DuplicateImageWarning, stacklevel=3)
    if model.train_digests_ is None:
        if not allow_training_images:
            warnings.warn(
                "this model was saved without the content digests of its training images: calibrate cannot "
                "check that these images are new to it (fit it again to record them)",
                CalibrationWarning, stacklevel=3,
            )
    elif not allow_training_images:
        training = set(model.train_digests_)
        learned = [item.source for item, digest in zip(kept, digests) if digest in training]
        if learned:
            raise FlawmapError(
                f"{len(learned)} of the {len(kept)} calibration images {'is a training image' if len(learned) == 1 else 'are training images'} of this model "
                f"({name_some(learned)}): their scores are in-sample, too low, and would lower the threshold; "
                "give good images it never learned from (or --allow-training-images)"
            )
    check_calibration_count(len(kept), "distinct ")
    return kept


def held_out_order(samples: Sequence[Sample], model: AnomalyModel, first: bool) -> tuple[list[int], int]:
    """The samples' indices by a seeded hash of each image's identity, and how many of the first
    are held out: about ``calibration_fraction`` of them, so the same images are held out whether
    they come in one fit or in several, and wherever the dataset lies; a first fit holds out at
    least one and keeps at least one."""
    if not samples:
        raise FlawmapError("no training images given")
    draws = np.array([uniform_hash(model.random_state, sample) for sample in samples])
    n_held = int((draws < model.calibration_fraction).sum())
    if first:
        n_held = min(max(n_held, 1), len(samples) - 1)
    return [int(i) for i in np.argsort(draws, kind="stable")], n_held


def cross_fit_sources(samples: Sequence[Sample], seed: int) -> set[str]:
    """Sources of the samples to score leave-one-out: all, or the :data:`CROSS_FIT_MAX_IMAGES`
    with the smallest seeded hashes of their identity."""
    if len(samples) > CROSS_FIT_MAX_IMAGES:
        samples = sorted(samples, key=lambda sample: uniform_hash(seed, sample))[:CROSS_FIT_MAX_IMAGES]
    return {sample.source for sample in samples}


def uniform_hash(seed: int, sample: Sample) -> float:
    """A number in [0, 1) fixed by ``seed`` and the image's identity (its pixels when in memory)."""
    digest = hashlib.sha256(f"{seed}\0".encode())
    if sample.pixels is not None:
        digest.update(str(sample.pixels.shape).encode())
        digest.update(np.ascontiguousarray(sample.pixels).tobytes())
    else:
        # folder and file name of the real file: survives moving the dataset and links to its files
        digest.update("/".join(sample.image_path.resolve().parts[-2:]).encode())
    return int.from_bytes(digest.digest()[:8], "big") / 2.0**64


def _without(samples: list[Sample], indices: Sequence[int]) -> list[Sample]:
    """``samples`` without those at ``indices``, in order."""
    dropped = set(indices)
    return [sample for i, sample in enumerate(samples) if i not in dropped]


def map_tensors(function: Any, value: Any) -> Any:
    """``value`` (a tensor, or tuples, named tuples and lists of them) with ``function`` applied to each tensor."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(function, item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(function, item) for item in value)
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (see :func:`map_tensors`)."""
    found: list[torch.Tensor] = []
    map_tensors(found.append, value)
    return found


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images (B, 3, S, S) float in [0, 1] -> uint8 (B, 3, S, S)."""
    return np.rint(np.asarray(images) * 255.0).astype(np.uint8)
