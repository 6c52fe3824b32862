"""The estimator contract every method implements, and the pipeline they all share.

A method is a keyword-only dataclass of hyper-parameters (``__init__`` only stores them). The
shared pipeline is: images -> ``flawmap.data`` loader -> frozen backbone -> the method's
``_embed`` -> the method's ``_fit`` or ``_score`` -> ``flawmap.postprocess`` -> scores and maps.

A method module implements four hooks and registers itself:

- ``_embed(images)``: ``B x 3 x S x S`` images in [0, 1] to the method's features;
- ``_fit(feature_batches)``: learn normality from an iterator of embedded batches of normal images;
- ``_score(features)``: raw patch scores ``B x h x w`` and, optionally, image scores ``B``
  (when ``None``, the image score is the maximum of the smoothed anomaly map);
- ``_state()`` / ``_set_state(tensors)``: the fitted tensors, for saving and loading.

Fitting also calibrates an image-score threshold on a held-out part of the normal training
images (``calibration_fraction``), so ``is_anomalous`` needs no defect images.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch

from flawmap import postprocess
from flawmap.backbones import Backbone, create_backbone
from flawmap.data import Dataset, Sample, iter_batches, open_dataset, samples_from_paths
from flawmap.errors import FlawmapError
from flawmap.neighbors import fast_low_precision_dtype
from flawmap.registry import Registry

METHODS: Registry[type["AnomalyModel"]] = Registry("method")

PRECISIONS = ("auto", "float32", "bfloat16")

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
    """

    sample: Sample
    score: float
    is_anomalous: bool
    anomaly_map: np.ndarray


@dataclass(frozen=True)
class PatchScores:
    """What a method's ``_score`` returns: ``patch_scores`` (B, h, w), optional ``image_scores`` (B,)."""

    patch_scores: torch.Tensor
    image_scores: torch.Tensor | None = None


def register_method(name: str):
    """Class decorator: register a method under ``name`` (its CLI ``--method`` value)."""

    def decorator(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        cls.method = name
        return METHODS.register(name)(cls)

    return decorator


@dataclass(kw_only=True, eq=False)
class AnomalyModel:
    """Base estimator. Shared hyper-parameters:

    Parameters
    ----------
    backbone : str
        Registered backbone name (``flawmap.backbones.list_backbones()``).
    weights : str or None
        Local checkpoint for the backbone; None uses the packaged ImageNet weights.
    taps : tuple of str or None
        Backbone stages to read; None uses the backbone's stride-8 and stride-16 stages.
    image_size : int
        Images are resized to ``image_size x image_size`` for the network.
    sigma : float
        Gaussian smoothing of the anomaly map, in input pixels.
    calibration_fraction : float
        Share of the normal training images held out to calibrate the threshold.
    false_alarm_rate : float
        Target share of normal images flagged as anomalous by the threshold.
    batch_size, num_workers : int
        Images per backbone pass; image-decoding threads.
    random_state : int
        Seed for every random choice in fitting.
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    precision : {"auto", "float32", "bfloat16"}
        Arithmetic of the backbone pass and of nearest-neighbour searches. ``"auto"`` uses
        bfloat16 where the hardware computes it natively (GPUs, CPUs with AVX512-BF16 or AMX):
        about 3x faster backbone and 2.5x faster search (bfloat16 candidates, exact float32
        re-rank; see ``flawmap.neighbors.NearestNeighbors``), with PatchCore's metrics on MVTec
        bottle unchanged. ``"float32"`` gives exact arithmetic everywhere.
    progress : bool
        Show progress bars on long steps.
    """

    method: ClassVar[str] = ""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    taps: tuple[str, ...] | None = None
    image_size: int = 256
    sigma: float = postprocess.DEFAULT_SIGMA
    calibration_fraction: float = 0.1
    false_alarm_rate: float = 0.01
    batch_size: int = 16
    num_workers: int = 2
    random_state: int = 0
    device: str = "cpu"
    precision: str = "auto"
    progress: bool = False

    # ------------------------------------------------------------------ public API
    def fit(self, images: ImageInput, *, skip_invalid: bool = False) -> "AnomalyModel":
        """Learn normality from normal images and calibrate the threshold; returns ``self``.

        ``images``: a dataset folder (its ``train/good`` is used), a folder of good images,
        image files, uint8 arrays, or a sequence of these (one model over all of them).
        """
        self._validate_params()
        samples = training_samples(images)
        fit_samples, calibration_samples = self._split_calibration(samples)
        self.backbone_ = self._build_backbone()
        self.taps_ = tuple(self.taps or self.backbone_.default_taps)
        self.n_train_images_ = len(fit_samples)
        # seconds spent decoding and embedding the training images, the rest of _fit, calibration
        self.fit_seconds_ = {"features": 0.0}
        start = time.perf_counter()
        self._fit(_timed(self._embedded_batches(fit_samples, skip_invalid, "extracting features"), self.fit_seconds_))
        fitted = time.perf_counter()
        self._calibrate(calibration_samples, skip_invalid)
        self.fit_seconds_["method"] = fitted - start - self.fit_seconds_["features"]
        self.fit_seconds_["calibration"] = time.perf_counter() - fitted
        return self

    def predict(self, images: ImageInput, *, skip_invalid: bool = False) -> list[Prediction]:
        """Score images: one Prediction (score, flag, map at original size) per image, in order."""
        return [prediction for prediction, _ in self.iter_predictions(prediction_samples(images), skip_invalid=skip_invalid)]

    def iter_predictions(
        self, samples: Sequence[Sample], *, load_masks: bool = False, skip_invalid: bool = False
    ) -> Iterator[tuple[Prediction, np.ndarray | None]]:
        """Stream ``(Prediction, mask)`` pairs; masks (bool, original size) only with ``load_masks``."""
        self._check_is_fitted()
        for batch in self._batches(samples, skip_invalid, "predicting", load_masks=load_masks):
            image_scores, maps = self._score_images(batch.images)
            for sample, score, anomaly_map, original_hw, mask in zip(
                batch.samples, image_scores.tolist(), maps, batch.original_hw, batch.masks
            ):
                full_map = postprocess.to_original_size(anomaly_map, original_hw)
                yield Prediction(sample, score, score > self.threshold_, full_map), mask

    def save(self, directory: str | Path) -> Path:
        """Write the fitted model to ``directory`` atomically (config.json + safetensors)."""
        from flawmap import io

        self._check_is_fitted()
        return io.save_model(self, directory)

    @staticmethod
    def load(directory: str | Path) -> "AnomalyModel":
        """Load a model saved by :meth:`save`; never executes code from the files."""
        from flawmap import io

        return io.load_model(directory)

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as a plain dict (scikit-learn style)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.init}

    # ------------------------------------------------------------------ method hooks
    def _embed(self, images: torch.Tensor) -> Any:
        """Images (B, 3, S, S) in [0, 1] to the method's features."""
        raise NotImplementedError

    def _fit(self, feature_batches: Iterable[Any]) -> None:
        """Learn normality from embedded batches of normal images (consumed once)."""
        raise NotImplementedError

    def _score(self, features: Any) -> PatchScores:
        """Raw patch scores (B, h, w), and image scores (B,) if the method defines its own."""
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        """Fitted tensors to save (method part only)."""
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`_state` returned."""
        raise NotImplementedError

    def _validate_method_params(self) -> None:
        """Raise FlawmapError for out-of-range method hyper-parameters."""

    # ------------------------------------------------------------------ shared machinery
    def _validate_params(self) -> None:
        if self.image_size < 32 or self.image_size % 8:
            raise FlawmapError(f"image_size must be a multiple of 8 and at least 32, got {self.image_size}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise FlawmapError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        if not 0.0 <= self.false_alarm_rate < 1.0:
            raise FlawmapError(f"false_alarm_rate must be in [0, 1), got {self.false_alarm_rate}")
        if self.precision not in PRECISIONS:
            raise FlawmapError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1 or self.num_workers < 1:
            raise FlawmapError("batch_size and num_workers must be at least 1")
        self._validate_method_params()

    def _build_backbone(self) -> Backbone:
        return create_backbone(self.backbone, self.weights).to(self.device)

    def _low_precision_dtype(self) -> torch.dtype | None:
        """bfloat16 when ``precision`` asks for it (or ``"auto"`` finds it fast), else None."""
        if self.precision == "auto":
            return fast_low_precision_dtype(torch.device(self.device))
        return torch.bfloat16 if self.precision == "bfloat16" else None

    def _autocast(self) -> torch.autocast:
        """Network arithmetic: bfloat16 autocast when ``precision`` asks for it, else float32."""
        low_precision = self._low_precision_dtype()
        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=low_precision or torch.float32, enabled=low_precision is not None)

    def _backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped feature maps (B, C_l, H_l, W_l) in float32, computed at ``precision``."""
        with self._autocast():
            levels = self.backbone_.features(images, self.taps_)
        return [level.float() for level in levels]

    def _split_calibration(self, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        """Hold out ``calibration_fraction`` of the samples (at least one) at random."""
        if len(samples) < 2:
            raise FlawmapError(f"need at least 2 training images (one is held out for calibration), got {len(samples)}")
        n_calibration = min(len(samples) - 1, max(1, round(self.calibration_fraction * len(samples))))
        order = np.random.default_rng(self.random_state).permutation(len(samples))
        held_out = set(order[:n_calibration].tolist())
        fit_samples = [sample for i, sample in enumerate(samples) if i not in held_out]
        return fit_samples, [samples[i] for i in sorted(held_out)]

    def _batches(self, samples: Sequence[Sample], skip_invalid: bool, what: str, load_masks: bool = False):
        return iter_batches(
            samples,
            self.image_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            load_masks=load_masks,
            skip_invalid=skip_invalid,
            progress=what if self.progress else None,
        )

    def _embedded_batches(self, samples: Sequence[Sample], skip_invalid: bool, what: str) -> Iterator[Any]:
        for batch in self._batches(samples, skip_invalid, what):
            with torch.inference_mode():
                yield self._embed(batch.images.to(self.device))

    def _score_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) to image scores (B,) and smoothed maps (B, S, S) on the CPU."""
        with torch.inference_mode():
            scored = self._score(self._embed(images.to(self.device)))
            maps = postprocess.anomaly_maps(scored.patch_scores, self.image_size, self.sigma)
            image_scores = scored.image_scores.cpu() if scored.image_scores is not None else maps.amax(dim=(1, 2))
        return image_scores.float(), maps

    def _calibrate(self, samples: Sequence[Sample], skip_invalid: bool) -> None:
        """Threshold and display range from held-out normal images only."""
        image_scores, map_maxima, map_medians = [], [], []
        for batch in self._batches(samples, skip_invalid, "calibrating"):
            scores, maps = self._score_images(batch.images)
            image_scores.append(scores)
            map_maxima.append(maps.amax(dim=(1, 2)))
            map_medians.append(maps.flatten(1).median(dim=1).values)
        if not image_scores:
            raise FlawmapError("no valid calibration image left: every held-out image was skipped")
        normal_scores = torch.cat(image_scores).numpy()
        self.threshold_ = postprocess.normal_quantile_threshold(normal_scores, self.false_alarm_rate)
        self.map_low_ = float(torch.cat(map_medians).median())
        self.map_high_ = postprocess.normal_quantile_threshold(torch.cat(map_maxima).numpy(), self.false_alarm_rate)
        self.calibration_scores_ = normal_scores.tolist()

    def _check_is_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise FlawmapError(f"this {type(self).__name__} is not fitted yet: call fit() first")

    def _fitted_scalars(self) -> dict[str, Any]:
        """Fitted values that are not tensors, saved in config.json."""
        return {
            "taps_": list(self.taps_),
            "n_train_images_": self.n_train_images_,
            "threshold_": self.threshold_,
            "map_low_": self.map_low_,
            "map_high_": self.map_high_,
            "calibration_scores_": self.calibration_scores_,
            "fit_seconds_": self.fit_seconds_,
        }


def check_positive_odd(name: str, value: int) -> None:
    """Raise FlawmapError unless the hyper-parameter ``name`` is a positive odd integer."""
    if value < 1 or value % 2 == 0:
        raise FlawmapError(f"{name} must be a positive odd number, got {value}")


def training_samples(images: ImageInput) -> list[Sample | np.ndarray]:
    """Normal training images from any accepted input (dataset folders contribute ``train/good``)."""
    if isinstance(images, Dataset):
        return list(images.train)
    if isinstance(images, (str, Path)):
        path = Path(images)
        return list(open_dataset(path).train) if path.is_dir() else samples_from_paths([path])
    if isinstance(images, np.ndarray):
        return [images]
    return [sample for item in images for sample in training_samples(item)]


def prediction_samples(images: ImageInput) -> list[Sample | np.ndarray]:
    """Images to score: files, folders of images, a Dataset (its test split) or uint8 arrays."""
    if isinstance(images, Dataset):
        return list(images.test)
    if isinstance(images, (str, Path)):
        return samples_from_paths([images])
    if isinstance(images, np.ndarray):
        return [images]
    items = list(images)
    if all(isinstance(item, np.ndarray) for item in items):
        return items
    return samples_from_paths(items)


def _timed(batches: Iterator[Any], seconds: dict[str, float]) -> Iterator[Any]:
    """Yield from ``batches``, adding the time spent producing them to ``seconds["features"]``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds["features"] += time.perf_counter() - start
        if batch is None:
            return
        yield batch
