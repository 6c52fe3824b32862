"""The estimator every method is: hyper-parameters, fit, calibration, and the hooks a method implements.

A method is a keyword-only dataclass of hyper-parameters (``__init__`` only stores them) plus a
*scorer* (:class:`flawmap.models.scorer.Scorer`: images to patch scores, the fitted tensors as its
buffers), the one inference path. What follows the scores (postprocessing, resizing to the
original size, the threshold) is :class:`flawmap.prediction.Predictor`, shared with ONNX models.

How a model runs (device, precision, batch size, decoding threads, progress bars) is a
:class:`flawmap.runtime.Runtime`, set with :meth:`AnomalyModel.set_runtime` or at load time, and
never saved.

A method module implements five hooks and registers itself with :func:`register_method`:

- ``_new_scorer(backbone, taps)``: its scorer, able to embed images; not yet able to score;
- ``_learn(feature_batches)``: learn from an iterator of embedded batches of normal images. The
  first call starts from nothing, later calls (``partial_fit``) add to what was learned;
  afterwards the scorer can score;
- ``to_state()`` / ``from_state(fitted, tensors)``: the method's fitted state as JSON values and
  tensors, and back (into a model whose scorer ``_new_scorer`` just made);
- ``_validate_method_params()``: reject bad hyper-parameters with a FlawmapError.

The threshold is calibrated on out-of-sample scores of normal images, so ``is_anomalous``
needs no defect images and flags about ``false_alarm_rate`` of normal ones. How a fit gets those
scores is a strategy object (:mod:`flawmap.models.calibrators`: cross-fit, hold-out, tiled
hold-out) chosen by ``_calibrator_class`` from the method's :class:`MethodTraits` and the tiling,
through two more hooks:

- ``_left_out_scores(features, image_ids)``: for methods whose traits cross-fit, the scores of
  embedded *training* images by the fitted model without what it learned from each of them;
- ``_held_out_scores(images)``: the scores of held-out images (as in prediction by default).

Saving and loading (no code executed, older formats migrated) are :mod:`flawmap.models.persistence`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch

from flawmap import postprocess
from flawmap.backbones import Backbone, create_backbone
from flawmap.calibration import (
    CALIBRATION_HISTORY_LENGTH,
    Calibration,
    CalibrationWarning,
    calibrate_threshold,
    check_calibration_count,
    check_false_alarm_rate,
)
from flawmap.data import Dataset, Sample
from flawmap.errors import FlawmapError
from flawmap.models.calibrators import (
    CALIBRATION_STATE,
    Calibrator,
    CrossFit,
    HoldOut,
    TiledCrossFit,
    TiledHoldOut,
    distinct_calibration_samples,
    distinct_training_samples,
)
from flawmap.models.persistence import load_model, save_model
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.postprocessor import PostProcessor
from flawmap.prediction import ImageInput, Predictor, prediction_samples, training_samples
from flawmap.runtime import Runtime
from flawmap.tiling import check_tiling_params, choose_tiling



PARTIAL_FITS = ("exact", "approximate", "fine-tune", "none")
"""What ``partial_fit`` means for a method (:attr:`MethodTraits.partial_fit`)."""
EXPORT_BATCHES = ("dynamic", "fixed")
"""How a method's scorer exports (:attr:`MethodTraits.export_batch`)."""


@dataclass(frozen=True)
class MethodTraits:
    """What a method can do, declared once per method (``traits``), in the spirit of
    scikit-learn's estimator tags: the estimator and the contract tests read this one record.

    Attributes
    ----------
    cross_fits : bool
        Calibration scores each training image leave-one-out (``_left_out_scores``); otherwise
        ``calibration_fraction`` of the normal images is held out.
    trains_on_fit_images : bool
        A network is trained on the fit images. Such a method must not cross-fit: its networks
        have seen every image that leave-one-out would score.
    partial_fit : {"exact", "approximate", "fine-tune", "none"}
        ``partial_fit`` gives the model of one fit on all images (up to float rounding); or a
        model that keeps a summary of the earlier images (a coreset, a pool), close to one fit;
        or networks trained further on the new images only (the earlier ones can be forgotten);
        or a fitted model cannot learn more.
    export_batch : {"dynamic", "fixed"}
        Whether the ONNX graph takes any batch size or the one it was exported with.
    """

    cross_fits: bool = False
    trains_on_fit_images: bool = False
    partial_fit: str = "exact"
    export_batch: str = "dynamic"

    def __post_init__(self) -> None:
        if self.cross_fits and self.trains_on_fit_images:
            raise FlawmapError("a method that trains on its fit images cannot cross-fit (its networks saw every image)")
        if self.partial_fit not in PARTIAL_FITS or self.export_batch not in EXPORT_BATCHES:
            raise FlawmapError(f"partial_fit must be one of {PARTIAL_FITS} and export_batch one of {EXPORT_BATCHES}")


@dataclass(kw_only=True, eq=False)
class AnomalyModel(Predictor):
    """Base estimator; predicts through :class:`flawmap.prediction.Predictor`. Shared hyper-parameters:

    Parameters
    ----------
    backbone : str
        Registered backbone name (``flawmap.backbones.list_backbones()``).
    weights : str or None
        Local checkpoint for the backbone; None uses the packaged ImageNet weights.
    taps : tuple of str or None
        Backbone stages to read; None uses the backbone's stride-8 and stride-16 stages.
    image_size : int
        Images (or tiles) are resized to ``image_size x image_size`` for the network.
    tile_size : int, "auto" or None
        Cut images into ``tile_size`` square tiles at native resolution instead of resizing
        them whole (:mod:`flawmap.tiling`); usually equal to ``image_size``. None: no tiling.
        ``"auto"``: tiles of ``image_size`` when resizing would shrink the training images'
        shorter side more than :data:`flawmap.tiling.AUTO_TILE_FACTOR` times, else no tiling
        (chosen at the first fit: ``tile_size_``, with the reason in ``tiling_reason_``).
    tile_overlap : int
        Smallest overlap of neighbouring tiles in pixels, at most ``tile_size / 2``.
    sigma : float
        Gaussian smoothing of the anomaly map, in input pixels.
    calibration_fraction : float
        Share of the normal training images held out to calibrate the threshold, for methods
        that cannot cross-fit (``traits.cross_fits`` False); cross-fitted methods hold nothing out.
    false_alarm_rate : float
        Target share of normal images flagged as anomalous by the threshold, in (0, 1).
    random_state : int
        Seed for every random choice in fitting.

    Attributes
    ----------
    runtime : Runtime
        How the model runs here (device, precision, ...); not a hyper-parameter, never saved.
    """

    method: ClassVar[str] = ""
    #: What the method can do (:class:`MethodTraits`), declared once per method.
    traits: ClassVar[MethodTraits] = MethodTraits()
    #: Small hyper-parameters for a fast smoke fit at 64 px (tests and examples).
    quick_params: ClassVar[dict[str, Any]] = {}
    #: Named hyper-parameter sets (``flawmap fit --preset NAME``), e.g. a paper's configuration.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Hyper-parameters added in model format version ``V`` whose default is not how the method
    #: behaved before: ``{V: {name: the value that reproduces the older behaviour}}``, used when
    #: loading a model saved in a format before ``V``.
    former_params: ClassVar[dict[int, dict[str, Any]]] = {}

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    taps: tuple[str, ...] | None = None
    image_size: int = 256
    tile_size: int | str | None = "auto"
    tile_overlap: int = 32
    sigma: float = postprocess.DEFAULT_SIGMA
    calibration_fraction: float = 0.1
    false_alarm_rate: float = 0.01
    random_state: int = 0
    runtime: Runtime = field(default_factory=Runtime, init=False, repr=False)

    # ------------------------------------------------------------------ public API
    def set_runtime(self, runtime: Runtime | None = None, **settings: Any) -> "AnomalyModel":
        """Run on another device, precision, batch size, ... from now on; returns ``self``.

        ``model.set_runtime(device="cuda", precision="float32")`` or ``set_runtime(Runtime(...))``.
        """
        self.runtime = (runtime or self.runtime).replace(**settings)
        device = self.runtime.torch_device  # an unusable device is an error here, fitted or not
        if hasattr(self, "scorer_"):
            self.scorer_.to(device)
            self.scorer_.set_precision(self.runtime.low_precision_dtype())
        return self

    def fit(self, images: ImageInput, *, skip_invalid: bool = False) -> "AnomalyModel":
        """Learn normality from normal images and calibrate the threshold; returns ``self``.

        ``images``: a dataset folder (its ``train/good`` is used), a folder of good images,
        image files, uint8 arrays, or a sequence of these (one model over all of them). Anything
        learned before is forgotten; :meth:`partial_fit` adds to it instead.
        """
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("_")]:
            delattr(self, name)
        return self.partial_fit(images, skip_invalid=skip_invalid)

    def partial_fit(self, images: ImageInput, *, skip_invalid: bool = False) -> "AnomalyModel":
        """Learn from more normal images, keeping what was learned; returns ``self``.

        On an unfitted model this is :meth:`fit`. Afterwards the threshold is calibrated again
        (see the module docstring: the new training images' left-out scores join the earlier
        ones, or every held-out image is scored again).
        """
        first = not self.is_fitted()
        if not first and self.traits.partial_fit == "none":
            raise FlawmapError(f"method {self.method!r} cannot learn from more images; fit a new model on all of them")
        self._validate_params()
        samples, digests = distinct_training_samples(self, training_samples(images), first)
        if first and len(samples) < 2:
            raise FlawmapError(f"need at least 2 training images (to calibrate the threshold), got {len(samples)}")
        if first:
            backbone = create_backbone(self.backbone, self.weights)
            self.taps_ = tuple(self.taps or self._default_taps(backbone))
            self.tile_size_, self.tiling_reason_ = choose_tiling(self.tile_size, samples, self.image_size)
            self.scorer_ = self._new_scorer(backbone, self.taps_)
            self.n_train_images_, self.n_fits_ = 0, 0
            self.train_digests_: list[str] | None = []
            self.calibration_images_ = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
            self.calibration_scores_, self.calibration_map_maxima_, self.calibration_map_medians_ = [], [], []
        self.set_runtime()
        start = time.perf_counter()
        calibrator = self._calibrator_class()(self, first, skip_invalid)
        fit_samples = calibrator.split(samples)
        seconds = {"features": 0.0}
        if fit_samples:
            self._learn(_timed(self._embedded_batches(fit_samples, skip_invalid, calibrator), seconds))
            self.set_runtime()  # new fitted tensors follow the device and precision
        if not calibrator.n_embedded and (first or not calibrator.holds_out):
            raise FlawmapError("no valid training image left: every image was skipped")
        learned = time.perf_counter()
        self.n_train_images_ += calibrator.n_embedded
        self.n_fits_ += 1
        if self.train_digests_ is not None:
            self.train_digests_ += digests
        self.calibration_history_ = []  # earlier calibrations scored a model that no longer exists
        calibrator.add_normal_scores()
        self.calibrate_threshold()
        seconds["method"] = learned - start - seconds["features"]
        seconds["calibration"] = time.perf_counter() - learned
        self.fit_seconds_ = seconds
        return self

    def calibrate(
        self,
        images: ImageInput,
        *,
        false_alarm_rate: float | None = None,
        skip_invalid: bool = False,
        allow_training_images: bool = False,
    ) -> "AnomalyModel":
        """Re-calibrate the threshold on new normal images without refitting; returns ``self``.

        ``images``: at least :data:`~flawmap.calibration.MIN_CALIBRATION_IMAGES` distinct normal
        images the model never learned from (files, folders of images, arrays, PIL images; a
        Dataset gives its good test images); an image given twice counts once. Training images
        (recognised by content, :mod:`flawmap.data.digests`) are refused unless
        ``allow_training_images``, which the calibration's source then states. They are scored
        by the fitted model and replace the normal scores the threshold came from;
        ``false_alarm_rate`` (if given) becomes the model's target rate. The calibration
        replaced is kept in ``calibration_history_`` (:meth:`restore_calibration` puts it back).
        A later :meth:`partial_fit` calibrates again from the training data (module docstring).
        """
        self._check_is_fitted()
        if false_alarm_rate is not None:
            check_false_alarm_rate(false_alarm_rate)
        if isinstance(images, Dataset):
            samples = [sample for sample in images.test if not sample.is_anomalous]
        else:
            samples = prediction_samples(images)
        samples = distinct_calibration_samples(self, samples, allow_training_images)
        scored = [(score, anomaly_map) for _, score, anomaly_map, _, _ in self._scored(samples, skip_invalid, "calibrating")]
        check_calibration_count(len(scored), "valid ")
        previous = self._calibration_state()
        if false_alarm_rate is not None:
            self.false_alarm_rate = false_alarm_rate
        self.calibration_scores_, self.calibration_map_maxima_, self.calibration_map_medians_ = [], [], []
        self._add_normal_scores(scored)
        allowed = ", training images allowed (--allow-training-images)" if allow_training_images else ""
        self.calibrate_threshold(f"calibrate: {len(self.calibration_scores_)} new normal images{allowed}")
        self.calibration_history_ = [*self.calibration_history_, previous][-CALIBRATION_HISTORY_LENGTH:]
        return self

    def restore_calibration(self) -> "AnomalyModel":
        """Put back the calibration the last :meth:`calibrate` replaced (threshold, pixel
        threshold, false-alarm rate and their normal scores); returns ``self``."""
        self._check_is_fitted()
        if not self.calibration_history_:
            raise FlawmapError("no earlier calibration to restore (this model was not re-calibrated since its fit)")
        *self.calibration_history_, state = self.calibration_history_
        for name in CALIBRATION_STATE:
            setattr(self, name, Calibration.from_json(state[name]) if name == "calibration_" else state[name])
        return self

    def _calibration_state(self) -> dict[str, Any]:
        """The current calibration, JSON-ready (an entry of ``calibration_history_``)."""
        return {name: getattr(self, name).to_json() if name == "calibration_" else getattr(self, name)
                for name in CALIBRATION_STATE}

    def calibrate_threshold(self, source: str | None = None) -> Calibration:
        """Set ``threshold_`` (and the overlays' ``map_low_``, ``map_high_``) from the stored
        normal scores at ``false_alarm_rate``; returns the :class:`Calibration` (also ``calibration_``)."""
        if source is None:
            source = self._calibrator_class().describe(len(self.calibration_scores_))
        calibration = calibrate_threshold(
            np.asarray(self.calibration_scores_), self.false_alarm_rate, source=source, random_state=self.random_state
        )
        self.threshold_ = calibration.threshold
        self.map_low_ = float(np.median(self.calibration_map_medians_))
        self.map_high_ = self.pixel_calibration().threshold
        self.calibration_ = calibration
        return calibration

    def pixel_calibration(self) -> Calibration:
        """The pixel threshold ``map_high_`` as a :class:`Calibration`: the level that at most
        ``false_alarm_rate`` of normal images exceed anywhere in their map, estimated from the
        maxima of the same out-of-sample normal maps as the image threshold (same estimator and
        bootstrap interval; :mod:`flawmap.regions`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)  # the image threshold's calibration warns already
            return calibrate_threshold(
                np.asarray(self.calibration_map_maxima_), self.false_alarm_rate,
                source=f"maxima of the maps of {len(self.calibration_map_maxima_)} normal images", random_state=self.random_state,
            )

    def score_images(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) in [0, 1] (array or tensor) to image scores (B,) and smoothed maps
        (B, S, S), float32 numpy: ``scorer_`` plus the shared postprocessing."""
        if not hasattr(self, "scorer_"):
            self._check_is_fitted()
        with torch.inference_mode():
            scored = self.scorer_(torch.as_tensor(images).to(self.runtime.torch_device))
        return self._postprocess(scored)

    def save(self, directory: str | Path) -> Path:
        """Write the fitted model to ``directory`` atomically (config.json + safetensors, no pickle;
        :mod:`flawmap.models.persistence`)."""
        return save_model(self, directory)

    @staticmethod
    def load(directory: str | Path, **runtime_settings: Any) -> "AnomalyModel":
        """Load a model saved by :meth:`save` (:func:`flawmap.models.persistence.load_model`)."""
        return load_model(directory, **runtime_settings)

    @classmethod
    def upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters as a saved model holds them -> under today's names (a method that
        renamed or regrouped some maps the saved names here); ``params`` may be changed."""
        return params

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as a plain dict (scikit-learn style)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def is_fitted(self) -> bool:
        return hasattr(self, "threshold_")

    # ------------------------------------------------------------------ method hooks
    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> Scorer:
        """This method's scorer over ``backbone``: able to embed now, to score once fitted."""
        raise NotImplementedError

    def _learn(self, feature_batches: Iterable[Any]) -> None:
        """Learn from embedded batches of normal images (consumed once), adding to earlier fits."""
        raise NotImplementedError

    def _left_out_scores(self, features: Any, image_ids: torch.Tensor) -> PatchScores:
        """Scores of embedded training images (B of them, numbered ``image_ids`` (B,) as in
        ``_learn``) by the fitted model without what it learned from each one; methods that set
        ``traits.cross_fits`` implement it. For a tiled model ``image_ids`` is (B, 2): the first
        and end (exclusive) numbers of each tile's image's tiles, all left out."""
        raise NotImplementedError

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The method's fitted state: JSON values (keys ending in ``_``) and tensors."""
        raise NotImplementedError

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`to_state` returned into ``scorer_`` and the model."""
        raise NotImplementedError

    def _validate_method_params(self) -> None:
        """Raise FlawmapError for out-of-range method hyper-parameters."""

    def _default_taps(self, backbone: Backbone) -> tuple[str, ...]:
        """The taps used when ``taps`` is None: the backbone's default (stride 8 and 16)."""
        return backbone.default_taps

    # ------------------------------------------------------------------ shared machinery
    def _validate_params(self) -> None:
        if self.image_size < 32 or self.image_size % 8:
            raise FlawmapError(f"image_size must be a multiple of 8 and at least 32, got {self.image_size}")
        check_tiling_params(self.tile_size, self.tile_overlap)
        if not 0.0 < self.calibration_fraction < 1.0:
            raise FlawmapError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        check_false_alarm_rate(self.false_alarm_rate)
        if not self.sigma >= 0.0:
            raise FlawmapError(f"sigma must be >= 0, got {self.sigma}")
        self._validate_method_params()

    def _embedded_batches(self, samples: Sequence[Sample], skip_invalid: bool, calibrator: Calibrator) -> Iterator[Any]:
        """The scorer's features of each batch, computed in inference mode (yielded outside it),
        each batch shown to ``calibrator``; a tiled model embeds every tile of every image."""
        tiling = self.tiling()
        if tiling is None:
            batches = self._batches(samples, skip_invalid, "extracting features")
        else:
            batches = tiling.tile_batches(self._images(samples, skip_invalid, "extracting features"), self.runtime.batch_size)
        for batch in batches:
            with torch.inference_mode():
                features = self.scorer_.embed(torch.from_numpy(batch.images).to(self.runtime.torch_device))
            calibrator.observe(batch, features)
            yield features

    def _held_out_scores(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Held-out images (B, 3, S, S) in [0, 1] -> image scores (B,) and smoothed maps (B, S, S),
        float32 numpy: the fitted model's scores, as in prediction. A method whose density model
        also took the held-out images in (FYD) scores them leave-one-out here instead."""
        return self.score_images(images)

    def _add_normal_scores(self, scored: Iterable[tuple[float, np.ndarray]]) -> None:
        """Record out-of-sample normal images' scores and the maximum and median of their maps (H x W)."""
        for score, anomaly_map in scored:
            self.calibration_scores_.append(score)
            self.calibration_map_maxima_.append(float(anomaly_map.max()))
            self.calibration_map_medians_.append(float(np.median(anomaly_map)))

    def postprocessor(self) -> PostProcessor:
        """The :class:`~flawmap.postprocessor.PostProcessor` of this model's ``image_size`` and
        ``sigma`` (``postprocessor_``, built on first use after a fit or a load)."""
        if not hasattr(self, "postprocessor_"):
            self.postprocessor_ = PostProcessor(self.image_size, self.sigma)
        return self.postprocessor_

    def _postprocess(self, scored: PatchScores) -> tuple[np.ndarray, np.ndarray]:
        """Scorer output to image scores (B,) and smoothed maps (B, S, S), float32 numpy."""
        maps, image_scores = self.postprocessor()(scored.patch_scores, scored.image_scores)
        return image_scores.cpu().numpy(), maps.cpu().numpy()

    def _progress(self, description: str) -> str | None:
        """``description`` for a progress bar when the runtime shows them, else None."""
        return description if self.runtime.progress else None

    @classmethod
    def holds_out(cls) -> bool:
        """Whether a fit holds out ``calibration_fraction`` of the normal images to calibrate
        the threshold (so that the hyper-parameter matters): methods that do not cross-fit,
        tiled or not."""
        return not cls.traits.cross_fits

    def _calibrator_class(self) -> type[Calibrator]:
        """How this model's fits calibrate (:mod:`flawmap.models.calibrators`), tiled or not."""
        if self.tile_size_ is not None:
            return TiledCrossFit if self.traits.cross_fits else TiledHoldOut
        return CrossFit if self.traits.cross_fits else HoldOut

    def _check_is_fitted(self) -> None:
        if not self.is_fitted():
            raise FlawmapError(f"this {type(self).__name__} is not fitted yet: call fit() first")


def check_positive_odd(name: str, value: int) -> None:
    """Raise FlawmapError unless the hyper-parameter ``name`` is a positive odd integer."""
    if value < 1 or value % 2 == 0:
        raise FlawmapError(f"{name} must be a positive odd number, got {value}")


def _timed(batches: Iterator[Any], seconds: dict[str, float]) -> Iterator[Any]:
    """Yield from ``batches``, adding the time spent producing them to ``seconds["features"]``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds["features"] += time.perf_counter() - start
        if batch is None:
            return
        yield batch
