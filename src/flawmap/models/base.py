"""The estimator contract every method implements, and the pipeline they all share.

A method is a keyword-only dataclass of hyper-parameters (``__init__`` only stores them) plus a
*scorer*: one ``nn.Module`` that maps ``B x 3 x S x S`` images in [0, 1] to
``PatchScores(patch_scores B x h x w, image_scores B or None)``, with the fitted tensors as its
buffers. ``predict``, ``evaluate`` and (later) ONNX export and the server all run that one module,
so there is one inference path; postprocessing (upsampling, smoothing, resizing, thresholds) is
shared and stays outside it. What follows the scores (batching, resizing to the original size,
the threshold) is :class:`flawmap.prediction.Predictor`, shared with exported ONNX models.

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

The threshold is calibrated on out-of-sample scores of normal images (:mod:`flawmap.calibration`),
so ``is_anomalous`` needs no defect images and flags about ``false_alarm_rate`` of normal ones.
One mechanism serves every method, through one more hook:

- ``_left_out_scores(features, image_ids)``: for methods whose traits cross-fit, the
  scores of embedded *training* images by the fitted model without what it learned from each of
  them (leave one image out: a memory bank without that image's rows, Gaussians without its
  moments). Training images are numbered 0, 1, ... in the order their features reach
  ``_learn``, across fits (a fit's first image is number ``n_train_images_`` before it). After
  learning, the fit's training images are scored this way (from the features of the learning
  pass, or embedded once more), so nothing is held out; a fit of more than
  :data:`CROSS_FIT_MAX_IMAGES` images scores a seeded-hash sample of that many. The scores of earlier fits are
  kept as they were computed (against a smaller model, so they err on the high side).
- Methods without it (trained networks) hold out a share ``calibration_fraction`` of the normal
  images, chosen by a hash of each image's identity (so the same images are held out whether
  they arrive in one fit or several); the held-out images of every fit are kept in the model
  (``uint8``, at the network size) and all of them are scored again after every fit
  (``_held_out_scores``: as in prediction, unless the method's density model took them in too
  and scores them leave-one-out, as FYD's Gaussians do).

``calibration_images_`` are those held-out images, or for cross-fitted methods the first
:data:`KEPT_CROSS_FIT_IMAGES` training images (kept for checks such as the export parity test).

Tiled models (``tile_size_`` set, :mod:`flawmap.tiling`; ``tile_size="auto"`` is resolved at
the first fit) learn from every tile of every training image: each tile reaches ``_learn`` as one
image (``n_train_images_`` counts tiles). Their threshold is a quantile of *whole-image* scores,
as in prediction (:mod:`flawmap.models.tiled`): cross-fitted methods score each training image
with all of its tiles left out (``image_ids`` of shape (B, 2): the range of its tiles' numbers);
the others hold out ``calibration_fraction`` of the images and score them whole after learning.
The held-out images are not kept (they may be huge): each fit scores its own, and the scores of
earlier fits are kept as they were computed; ``calibration_images_`` are the first
:data:`KEPT_CROSS_FIT_IMAGES` training tiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from flawmap import io, postprocess
from flawmap.calibration import (
    CALIBRATION_HISTORY_LENGTH,
    MIN_CALIBRATION_IMAGES,
    Calibration,
    CalibrationWarning,
    calibrate_threshold,
    check_false_alarm_rate,
)
from flawmap.backbones import Backbone, create_backbone
from flawmap.data import Batch, Dataset, Sample, open_dataset, samples_from_paths
from flawmap.data.digests import DuplicateImageWarning, distinct_images, image_name, name_some
from flawmap.data.loader import InvalidImageWarning, pil_to_array
from flawmap.errors import FlawmapError
from flawmap.postprocessor import PostProcessor
from flawmap.prediction import ImageInput, Predictor, prediction_samples
from flawmap.registry import Registry
from flawmap.runtime import Runtime, autocast, progress_bar
from flawmap.models.tiled import left_out_whole_images
from flawmap.tiling import check_tiling_params, choose_tiling

METHODS: Registry[type["AnomalyModel"]] = Registry("method")
#: Training images a cross-fitted model keeps as ``calibration_images_`` (for checks).
KEPT_CROSS_FIT_IMAGES = 8
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


class PatchScores(NamedTuple):
    """What a scorer returns: ``patch_scores`` (B, h, w) and, for methods that define their own,
    ``image_scores`` (B,); None means "the maximum of the smoothed anomaly map"."""

    patch_scores: torch.Tensor
    image_scores: torch.Tensor | None = None


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


class Scorer(nn.Module):
    """A method's whole inference: images ``B x 3 x S x S`` in [0, 1] -> :class:`PatchScores`.

    ``forward(images) = score(embed(images))``. Subclasses implement :meth:`embed` (the frozen
    backbone's levels to the method's features; used for fitting too) and :meth:`score`. Fitted
    tensors are buffers or submodules (search indexes, networks), so ``.to(device)`` moves them
    all. Written to be traceable: no Python branches on data values, no SciPy.

    ``low_precision`` (set by :meth:`set_precision`, from the model's runtime) is the autocast
    dtype of the networks (None: float32); search indexes among the submodules follow it.
    """

    def __init__(self, backbone: Backbone, taps: Sequence[str]) -> None:
        super().__init__()
        backbone.tap_info(taps)
        self.backbone = backbone
        self.taps = tuple(taps)
        self.low_precision: torch.dtype | None = None

    def set_precision(self, low_precision: torch.dtype | None) -> None:
        """Use ``low_precision`` arithmetic (None: float32) in networks and searches from now on."""
        self.low_precision = low_precision
        for module in self.modules():
            if module is not self and hasattr(module, "set_precision"):
                module.set_precision(low_precision)

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context of this scorer's networks on ``device``."""
        return autocast(device, self.low_precision)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped backbone maps (B, C_l, H_l, W_l), finest first, in float32."""
        with self.autocast(images.device):
            levels = self.backbone.features(images, self.taps)
        return [level.float() for level in levels]

    def embed(self, images: torch.Tensor) -> Any:
        """Images (B, 3, S, S) -> the method's features."""
        raise NotImplementedError

    def score(self, features: Any) -> PatchScores:
        """The method's features -> patch scores (and image scores)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> PatchScores:
        return self.score(self.embed(images))

    def export_error(self) -> str | None:
        """Why this scorer cannot be exported to ONNX, in one line; None when it can."""
        return None


def register_method(name: str):
    """Class decorator: register a method under ``name`` (its CLI ``--method`` value)."""

    def decorator(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        cls.method = name
        return METHODS.register(name)(cls)

    return decorator


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
        samples, digests = self._distinct_training_samples(training_samples(images), first)
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
        cross_fit = self._cross_fitted()
        fit_samples, held_out = (samples, []) if cross_fit else self._hold_out(samples, first, skip_invalid)
        seconds = {"features": 0.0}
        training = _EmbeddedTraining(self.n_train_images_, fit_samples, self.random_state, cross_fit and self.tile_size_ is None)
        if fit_samples:
            self._learn(_timed(self._embedded_batches(fit_samples, skip_invalid, training), seconds))
            self.set_runtime()  # new fitted tensors follow the device and precision
        if not training.count and (first or cross_fit):
            raise FlawmapError("no valid training image left: every image was skipped")
        learned = time.perf_counter()
        self.n_train_images_ += training.count
        self.n_fits_ += 1
        if self.train_digests_ is not None:
            self.train_digests_ += digests
        self.calibration_history_ = []  # earlier calibrations scored a model that no longer exists
        if cross_fit and self.tile_size_ is not None:
            scored = left_out_whole_images(self, fit_samples, _cross_fit_keys(fit_samples, self.random_state), training.numbers, skip_invalid)
            self._add_normal_scores(_normal_summary(score, anomaly_map) for score, anomaly_map in scored)
        elif cross_fit:
            self._add_left_out_scores(fit_samples, training, skip_invalid)
        elif self.tile_size_ is not None:
            self._score_held_out_whole(held_out, skip_invalid)
        else:
            self._rescore_held_out(held_out)
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
        samples = self._distinct_calibration_samples(samples, allow_training_images)
        scored = self._scored(samples, skip_invalid, "calibrating")
        summaries = [_normal_summary(score, anomaly_map) for _, score, anomaly_map, _, _ in scored]
        _check_calibration_count(len(summaries), "valid ")
        previous = self._calibration_state()
        if false_alarm_rate is not None:
            self.false_alarm_rate = false_alarm_rate
        self.calibration_scores_, self.calibration_map_maxima_, self.calibration_map_medians_ = [], [], []
        self._add_normal_scores(summaries)
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

    def _distinct_training_samples(self, samples: list[Sample | np.ndarray], first: bool) -> tuple[list[Sample | np.ndarray], list[str]]:
        """``samples`` with each content once, and not one an earlier fit learned; their digests.
        Warns (:class:`~flawmap.data.digests.DuplicateImageWarning`) naming the dropped ones."""
        known = set() if first or self.train_digests_ is None else set(self.train_digests_)
        kept, digests, dropped = distinct_images(samples, known)
        if dropped:
            warnings.warn(
                f"{len(dropped)} training image{'s' if len(dropped) > 1 else ''} given again counted once: {name_some(dropped)}",
                DuplicateImageWarning, stacklevel=3,
            )
        return kept, digests

    def _distinct_calibration_samples(
        self, samples: list[Sample | np.ndarray], allow_training_images: bool
    ) -> list[Sample | np.ndarray]:
        """``samples`` with each content once; FlawmapError for training images (unless allowed)
        or fewer than MIN_CALIBRATION_IMAGES distinct ones."""
        kept, digests, dropped = distinct_images(samples)
        if dropped:
            warnings.warn(f"calibration images given again counted once: {name_some(dropped)}", DuplicateImageWarning, stacklevel=3)
        if self.train_digests_ is None:
            if not allow_training_images:
                warnings.warn(
                    "this model was saved without the content digests of its training images: calibrate cannot "
                    "check that these images are new to it (fit it again to record them)",
                    CalibrationWarning, stacklevel=3,
                )
        elif not allow_training_images:
            training = set(self.train_digests_)
            learned = [image_name(item, i) for i, (item, digest) in enumerate(zip(kept, digests)) if digest in training]
            if learned:
                raise FlawmapError(
                    f"{len(learned)} of the {len(kept)} calibration images {'is a training image' if len(learned) == 1 else 'are training images'} of this model "
                    f"({name_some(learned)}): their scores are in-sample, too low, and would lower the threshold; "
                    "give good images it never learned from (or --allow-training-images)"
                )
        _check_calibration_count(len(kept), "distinct ")
        return kept

    def calibrate_threshold(self, source: str | None = None) -> Calibration:
        """Set ``threshold_`` (and the overlays' ``map_low_``, ``map_high_``) from the stored
        normal scores at ``false_alarm_rate``; returns the :class:`Calibration` (also ``calibration_``)."""
        if source is None:
            if self._cross_fitted():
                how = "cross-fit, each training image scored leave-one-out" + (" (all its tiles), tiled and scored whole" if self.tile_size_ else "")
            else:
                how = "held-out normal images" + (", tiled and scored whole" if self.tile_size_ else "")
            source = f"{how} ({len(self.calibration_scores_)} images)"
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
        """Write the fitted model to ``directory`` atomically (config.json + safetensors, no pickle)."""
        self._check_is_fitted()
        method_fitted, method_tensors = self.to_state()
        groups = {"model": method_tensors, "calibration": {"images": self.calibration_images_}}
        if self.weights is not None:
            groups["backbone"] = self.scorer_.backbone.state_dict()
        document = {
            "method": self.method,
            "params": self.get_params(),  # tuples become JSON lists; load_model turns taps back
            "fitted": {**self._fitted_scalars(), **method_fitted},
            "saved_with": {"device": self.runtime.device, "precision": self.runtime.precision, "torch": torch.__version__},
        }
        return io.save_model_directory(directory, document, groups)

    @staticmethod
    def load(directory: str | Path, **runtime_settings: Any) -> "AnomalyModel":
        """Load a model saved by :meth:`save` (see :func:`load_model`)."""
        return load_model(directory, **runtime_settings)

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

    def _hold_out(
        self, samples: list[Sample | np.ndarray], first: bool, skip_invalid: bool
    ) -> tuple[list[Sample | np.ndarray], list[np.ndarray]]:
        """Split off about ``calibration_fraction`` of the samples, chosen by a seeded hash of
        each image's identity (its folder and file name, or an array's pixels): the same images
        are held out whether they come in one fit or in several, and wherever the dataset lies.

        Returns the samples to learn from and the held-out images, decoded (uint8, 3 x S x S);
        for a tiled model the held-out samples themselves (scored whole after learning). A
        first fit holds out at least one valid image (with ``skip_invalid``, the next images by
        hash replace unreadable ones; not checked here for a tiled model) and keeps at least
        one to learn from.
        """
        if not samples:
            raise FlawmapError("no training images given")
        draws = np.array([_uniform_hash(self.random_state, sample) for sample in samples])
        order = [int(i) for i in np.argsort(draws, kind="stable")]
        n_held = int((draws < self.calibration_fraction).sum())
        if first:
            n_held = min(max(n_held, 1), len(samples) - 1)
        held, decoded = order[:n_held], []
        if self.tile_size_ is not None:
            kept = set(held)
            return [sample for i, sample in enumerate(samples) if i not in kept], [samples[i] for i in held]
        while True:
            decoded = [image for batch in self._batches([samples[i] for i in held], skip_invalid, "holding out")
                       for image in _to_uint8(batch.images)]
            if decoded or not first or len(held) >= len(samples) - 1:
                break
            held = order[: len(held) + 1]  # every held-out image was unreadable: try the next one
        kept = set(held)
        return [sample for i, sample in enumerate(samples) if i not in kept], decoded

    def _embedded_batches(
        self, samples: Sequence[Sample | np.ndarray], skip_invalid: bool, training: "_EmbeddedTraining"
    ) -> Iterator[Any]:
        """The scorer's features of each batch, computed in inference mode (yielded outside it);
        ``training`` numbers the embedded images (and keeps their features, when asked). A tiled
        model embeds every tile of every image, and keeps the first tiles as calibration images."""
        tiling = self.tiling()
        if tiling is None:
            batches = self._batches(samples, skip_invalid, "extracting features")
        else:
            batches = tiling.tile_batches(self._images(samples, skip_invalid, "extracting features"), self.runtime.batch_size)
        for batch in batches:
            with torch.inference_mode():
                features = self.scorer_.embed(torch.from_numpy(batch.images).to(self.runtime.torch_device))
            training.add(batch, features)
            if tiling is not None:
                self._keep_calibration_images(_to_uint8(batch.images[:KEPT_CROSS_FIT_IMAGES]))
            yield features

    def _add_left_out_scores(
        self, samples: Sequence[Sample | np.ndarray], training: "_EmbeddedTraining", skip_invalid: bool
    ) -> None:
        """Add the leave-one-out scores of this fit's (sampled) training images to the normal
        scores: from the features kept by the learning pass, or by embedding those images again
        (images skipped while learning are skipped again, silently: they were reported)."""
        if training.features is not None:
            device = self.runtime.torch_device
            with progress_bar(self._progress(LEFT_OUT_PROGRESS), total=training.n_kept, unit="img") as bar:
                for image_ids, features, images in training.kept_batches(self.runtime.batch_size):
                    self._add_left_out_batch(image_ids, _map_tensors(lambda t: t.to(device), features), images)
                    bar.update(len(image_ids))
            return
        scored = [(key, sample) for key, sample in _keyed(samples) if key in training.scored]
        # a re-embedded array is named by its place among the scored samples: back to its key
        key_of = {key: original for (key, _), (original, _) in zip(_keyed([sample for _, sample in scored]), scored)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InvalidImageWarning)
            for batch in self._batches([sample for _, sample in scored], skip_invalid, LEFT_OUT_PROGRESS):
                image_ids = torch.tensor([training.numbers[key_of[str(sample.image_path)]] for sample in batch.samples])
                with torch.inference_mode():
                    features = self.scorer_.embed(torch.from_numpy(batch.images).to(self.runtime.torch_device))
                self._add_left_out_batch(image_ids, features, _to_uint8(batch.images))

    def _add_left_out_batch(self, image_ids: torch.Tensor, features: Any, images: np.ndarray) -> None:
        """Score one batch of training images leave-one-out; keep the first images (uint8
        B x 3 x S x S) as ``calibration_images_``."""
        with torch.inference_mode():
            image_scores, maps = self._postprocess(self._left_out_scores(features, image_ids))
        self._add_normal_scores(map(_normal_summary, image_scores.tolist(), maps))
        self._keep_calibration_images(images)

    def _keep_calibration_images(self, images: np.ndarray) -> None:
        """Add the first of ``images`` (uint8 B x 3 x S x S) to ``calibration_images_``, up to
        :data:`KEPT_CROSS_FIT_IMAGES` in all."""
        room = KEPT_CROSS_FIT_IMAGES - self.calibration_images_.shape[0]
        if room > 0 and len(images):
            self.calibration_images_ = torch.cat([self.calibration_images_, torch.from_numpy(images[:room])])

    def _rescore_held_out(self, new_images: list[np.ndarray]) -> None:
        """Add the new held-out images and score every held-out image again (the model changed)."""
        if new_images:
            self.calibration_images_ = torch.cat([self.calibration_images_, torch.from_numpy(np.stack(new_images))])
        if self.calibration_images_.shape[0] == 0:
            raise FlawmapError("no valid calibration image left: every held-out image was skipped")
        self.calibration_scores_, self.calibration_map_maxima_, self.calibration_map_medians_ = [], [], []
        n_images = self.calibration_images_.shape[0]
        with progress_bar(self._progress(HELD_OUT_PROGRESS), total=n_images, unit="img") as bar:
            for start in range(0, n_images, self.runtime.batch_size):
                images = self.calibration_images_[start : start + self.runtime.batch_size].float().div_(255.0)
                image_scores, maps = self._held_out_scores(images)
                self._add_normal_scores(map(_normal_summary, image_scores.tolist(), maps))
                bar.update(images.shape[0])

    def _held_out_scores(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Held-out images (B, 3, S, S) in [0, 1] -> image scores (B,) and smoothed maps (B, S, S),
        float32 numpy: the fitted model's scores, as in prediction. A method whose density model
        also took the held-out images in (FYD) scores them leave-one-out here instead."""
        return self.score_images(images)

    def _score_held_out_whole(self, samples: list[Sample | np.ndarray], skip_invalid: bool) -> None:
        """Tiled models: add the whole-image scores of this fit's held-out images (tiled and
        stitched as in prediction) to those of earlier fits."""
        scored = self._scored(samples, skip_invalid, HELD_OUT_PROGRESS)
        self._add_normal_scores(_normal_summary(score, anomaly_map) for _, score, anomaly_map, _, _ in scored)
        if not self.calibration_scores_:
            raise FlawmapError("no valid calibration image left: every held-out image was skipped")

    def _add_normal_scores(self, summaries: Iterable[tuple[float, float, float]]) -> None:
        """Record out-of-sample normal images' ``(score, map maximum, map median)`` (:func:`_normal_summary`)."""
        for score, maximum, median in summaries:
            self.calibration_scores_.append(score)
            self.calibration_map_maxima_.append(maximum)
            self.calibration_map_medians_.append(median)

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

    def _cross_fitted(self) -> bool:
        """Whether fits calibrate on leave-one-out scores of the training images (module docstring)."""
        return not self.holds_out()

    def _check_is_fitted(self) -> None:
        if not self.is_fitted():
            raise FlawmapError(f"this {type(self).__name__} is not fitted yet: call fit() first")

    def _fitted_scalars(self) -> dict[str, Any]:
        """Fitted values of every method that are not tensors, saved in config.json."""
        return {
            "taps_": list(self.taps_),
            "n_train_images_": self.n_train_images_,
            "n_fits_": self.n_fits_,
            "threshold_": self.threshold_,
            "map_low_": self.map_low_,
            "map_high_": self.map_high_,
            "calibration_": self.calibration_.to_json(),
            "calibration_scores_": self.calibration_scores_,
            "calibration_map_maxima_": self.calibration_map_maxima_,
            "calibration_map_medians_": self.calibration_map_medians_,
            "fit_seconds_": self.fit_seconds_,
            "train_digests_": self.train_digests_,
            "calibration_history_": self.calibration_history_,
            "tile_size_": self.tile_size_,
            "tiling_reason_": self.tiling_reason_,
        }


def load_model(directory: str | Path, **runtime_settings: Any) -> AnomalyModel:
    """Load a model directory written by :meth:`AnomalyModel.save`; never executes code from it.

    ``runtime_settings`` (``device``, ``precision``, ``batch_size``, ``num_workers``,
    ``progress``) choose how it runs here; where it was fitted does not matter. A tampered or
    foreign directory is a FlawmapError naming ``config.json`` or the tensor file and the problem.
    """
    source = Path(directory)
    config, files = io.read_model_directory(source)
    config_path = source / io.CONFIG_FILE
    model_class = METHODS.get(config["method"]) if config["method"] in METHODS else None
    if model_class is None:
        raise FlawmapError(f"{config_path}: unknown method {config['method']!r}; choose one of: {', '.join(METHODS.names())}")
    params = config["params"]
    if config["format_version"] != io.FORMAT_VERSION and isinstance(params, dict):
        # parameters added since it was saved: as the method behaved then
        params = {**_param_defaults(model_class), **_former_params(model_class, config["format_version"]), **params}
    params = io.check_params(config_path, params, _param_types(model_class))
    if params.get("taps") is not None:
        params["taps"] = tuple(params["taps"])
    if "backbone" in files:
        params["weights"] = str(files["backbone"])
    for group in ("model", "calibration"):
        if group not in files:
            raise FlawmapError(f"{config_path}: names no {group!r} tensor file; the model directory is incomplete")
    model = model_class(**params)
    try:
        model._validate_params()
    except FlawmapError as error:
        raise FlawmapError(f"{config_path}: {error}") from None
    model.runtime = model.runtime.replace(**runtime_settings)
    fitted = config["fitted"]
    if isinstance(fitted, dict):  # values added since it was saved: none recorded then
        former = {name: value for added, values in FORMER_FITTED.items() if config["format_version"] < added
                  for name, value in values.items()}
        fitted = {**former, **fitted}
        if "tile_size_" not in fitted:  # saved before tile_size="auto": it tiles as its parameter says
            fitted.update(zip(("tile_size_", "tiling_reason_"), choose_tiling(params["tile_size"], [], model.image_size)))
    fitted = io.check_fitted(config_path, fitted, FITTED_TYPES)
    model.taps_ = tuple(fitted.pop("taps_"))
    for name in FITTED_TYPES:
        if name != "taps_":
            setattr(model, name, fitted.pop(name))
    try:
        model.calibration_ = Calibration.from_json(model.calibration_)
    except ValueError as error:
        raise FlawmapError(f"{config_path}: 'calibration_': {error}") from None
    _check_history(config_path, model.calibration_history_)
    calibration = io.read_tensor_file(files["calibration"])
    images = calibration.get("images")
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, model.image_size, model.image_size):
        raise FlawmapError(f"{files['calibration']}: expected uint8 calibration images N x 3 x {model.image_size} x {model.image_size}")
    model.calibration_images_ = images
    try:
        model.scorer_ = model._new_scorer(create_backbone(model.backbone, model.weights), model.taps_)
    except (KeyError, ValueError, FlawmapError) as error:
        raise FlawmapError(f"{config_path}: 'taps_' do not fit backbone {model.backbone!r} ({error})") from None
    try:
        model.from_state(fitted, io.read_tensor_file(files["model"]))
    except (KeyError, RuntimeError, ValueError, IndexError, FlawmapError) as error:
        raise FlawmapError(f"{files['model']}: tensors do not match the {config['method']} configuration ({error})") from None
    model.set_runtime()
    _check_scorer_runs(model, config_path)
    return model


def _check_scorer_runs(model: AnomalyModel, config_path: Path) -> None:
    """Score one blank image: a config whose backbone or taps were edited loads (the backbone
    exists, the taps too) but embeds features of another size than the saved tensors."""
    try:
        model.score_images(torch.zeros(1, 3, model.image_size, model.image_size))
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise FlawmapError(
            f"{config_path}: its backbone and taps do not fit the saved tensors (was it edited? fit the model again): {reason}"
        ) from None


#: JSON types of the fitted values every model saves (``_fitted_scalars``).
FITTED_TYPES: dict[str, Any] = {
    "taps_": list,
    "n_train_images_": int,
    "n_fits_": int,
    "threshold_": float,
    "map_low_": float,
    "map_high_": float,
    "calibration_": dict,
    "calibration_scores_": list,
    "calibration_map_maxima_": list,
    "calibration_map_medians_": list,
    "fit_seconds_": dict,
    "train_digests_": list | None,
    "calibration_history_": list,
    "tile_size_": int | None,
    "tiling_reason_": str,
}
#: What a calibration changes in a model (saved as one entry of ``calibration_history_``).
CALIBRATION_STATE = (
    "false_alarm_rate", "threshold_", "map_low_", "map_high_", "calibration_",
    "calibration_scores_", "calibration_map_maxima_", "calibration_map_medians_",
)
#: Shared hyper-parameters added in a format version whose default is not how models behaved
#: before (as :attr:`AnomalyModel.former_params`): tiling (4) was off before ``tile_size="auto"``.
FORMER_SHARED_PARAMS: dict[int, dict[str, Any]] = {4: {"tile_size": None}}
#: Fitted values added in a format version: version -> their values in a model saved before it.
FORMER_FITTED: dict[int, dict[str, Any]] = {8: {"train_digests_": None, "calibration_history_": []}}


def _check_calibration_count(count: int, kind: str) -> None:
    """FlawmapError unless ``count`` reaches MIN_CALIBRATION_IMAGES (flawmap.calibration)."""
    if count < MIN_CALIBRATION_IMAGES:
        raise FlawmapError(
            f"calibrate needs at least {MIN_CALIBRATION_IMAGES} {kind}good images, got {count}: with fewer, "
            "the false-alarm rate of the threshold is unknown (see flawmap.calibration)"
        )


def _check_history(config_path: Path, history: list) -> None:
    """FlawmapError naming ``config_path`` unless each entry of ``calibration_history_`` is a calibration state."""
    for entry in history:
        try:
            if not isinstance(entry, dict) or set(entry) != set(CALIBRATION_STATE):
                raise ValueError(f"expected the keys {', '.join(CALIBRATION_STATE)}")
            Calibration.from_json(entry["calibration_"])
        except ValueError as error:
            raise FlawmapError(f"{config_path}: 'calibration_history_': {error}") from None


def _param_types(model_class: type[AnomalyModel]) -> dict[str, Any]:
    """Hyper-parameter name -> its type hint, for :func:`flawmap.io.check_params`."""
    hints = typing.get_type_hints(model_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(model_class) if f.init}


def _param_defaults(model_class: type[AnomalyModel]) -> dict[str, Any]:
    """Hyper-parameter name -> its default value, as JSON holds it (a tuple as a list)."""
    return {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(model_class)
        if f.init and f.default is not dataclasses.MISSING
    }


def _former_params(model_class: type[AnomalyModel], version: int) -> dict[str, Any]:
    """Hyper-parameter name -> the value that reproduces a model saved in format ``version``
    (:attr:`AnomalyModel.former_params`, and :data:`FORMER_SHARED_PARAMS`), for the parameters added since then."""
    changes = [*FORMER_SHARED_PARAMS.items(), *model_class.former_params.items()]
    return {name: value for added, values in changes if version < added for name, value in values.items()}


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
    if isinstance(images, (np.ndarray, Sample)):
        return [images]
    if isinstance(images, Image.Image):
        return [pil_to_array(images)]
    return [sample for item in images for sample in training_samples(item)]


def _normal_summary(score: float, anomaly_map: np.ndarray) -> tuple[float, float, float]:
    """What calibration keeps of a normal image: its score and its map's (H x W) maximum and median."""
    return score, float(anomaly_map.max()), float(np.median(anomaly_map))


def _uniform_hash(seed: int, sample: Sample | np.ndarray) -> float:
    """A number in [0, 1) fixed by ``seed`` and the image's identity (path, or array pixels)."""
    digest = hashlib.sha256(f"{seed}\0".encode())
    if isinstance(sample, np.ndarray):
        digest.update(str(sample.shape).encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    else:
        # folder and file name of the real file: survives moving the dataset and links to its files
        digest.update("/".join(sample.image_path.resolve().parts[-2:]).encode())
    return int.from_bytes(digest.digest()[:8], "big") / 2.0**64


class _EmbeddedTraining:
    """What a fit's learning pass leaves for its cross-fitting pass.

    ``count`` is the number of embedded images (of tiles, for a tiled model: its tiles share
    their image's key); ``numbers`` maps each embedded image's key (its path, or ``<array i>``)
    to its training image number; ``scored`` are the keys of the images to score leave-one-out
    (None: no cross-fitting) and ``capacity`` the number of samples with those keys.

    When the features of all ``capacity`` images fit in :data:`CROSS_FIT_CACHE_BYTES` (known at
    the first batch), they are kept on the CPU: ``features`` holds the first ``n_kept`` of them
    in learning order (the scorer's features with ``capacity`` rows each), ``image_ids``
    (capacity,) their image numbers and ``images`` the first of them as uint8 (n x 3 x S x S, at
    most :data:`KEPT_CROSS_FIT_IMAGES`). ``features`` is None when they do not fit, or without
    cross-fitting. Rows are copied into buffers allocated once for all of them: a slice kept per
    batch, between each batch's large temporaries, fragmented the C heap so that a fit's resident
    memory grew with its number of images.
    """

    def __init__(self, first_number: int, samples: Sequence[Sample | np.ndarray], seed: int, cross_fit: bool) -> None:
        self.first_number = first_number
        self.count = 0
        self.numbers: dict[str, int] = {}
        self.scored = _cross_fit_keys(samples, seed) if cross_fit else None
        self.capacity = sum(key in self.scored for key, _ in _keyed(samples)) if cross_fit else 0
        self.features: Any = None
        self.image_ids = torch.empty(self.capacity, dtype=torch.long)
        self.images: np.ndarray | None = None
        self.n_kept = 0
        self._caching = cross_fit

    def add(self, batch: Batch, features: Any) -> None:
        keys = [str(sample.image_path) for sample in batch.samples]
        for key in keys:
            self.numbers[key] = self.first_number + self.count
            self.count += 1
        if not self._caching:
            return
        rows = [i for i, key in enumerate(keys) if key in self.scored]
        if not rows:
            return
        if self.features is None:
            self.features = self._allocate(features)
            if self.features is None:  # too large: the cross-fitting pass embeds them again
                self._caching = False
                return
        index, end = torch.tensor(rows), self.n_kept + len(rows)
        for kept, new in zip(_tensors(self.features), _tensors(features)):
            kept[self.n_kept : end].copy_(new[index.to(new.device)])
        self.image_ids[self.n_kept : end] = torch.tensor([self.numbers[keys[i]] for i in rows])
        if self.n_kept < KEPT_CROSS_FIT_IMAGES:
            first = _to_uint8(batch.images[rows][: KEPT_CROSS_FIT_IMAGES - self.n_kept])
            self.images = first if self.images is None else np.concatenate([self.images, first])
        self.n_kept = end

    def kept_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Any, np.ndarray]]:
        """``(image numbers (b,), features on the CPU, their uint8 images among the first kept)``
        of the kept images, ``batch_size`` at a time (grouped as when they are embedded again)."""
        for start in range(0, self.n_kept, batch_size):
            rows = slice(start, min(start + batch_size, self.n_kept))
            yield self.image_ids[rows], _map_tensors(operator.itemgetter(rows), self.features), self.images[rows]

    def _allocate(self, features: Any) -> Any:
        """CPU buffers with ``capacity`` rows shaped like each of ``features``' rows; None when
        they would exceed :data:`CROSS_FIT_CACHE_BYTES`."""
        row_bytes = sum(t[0].numel() * t.element_size() for t in _tensors(features))
        if self.capacity * row_bytes > CROSS_FIT_CACHE_BYTES:
            return None
        return _map_tensors(lambda t: torch.empty(self.capacity, *t.shape[1:], dtype=t.dtype), features)


def _keyed(samples: Sequence[Sample | np.ndarray]) -> list[tuple[str, Sample | np.ndarray]]:
    """Each sample with the key the data loader names it by (its path, or ``<array i>``)."""
    return [(f"<array {i}>" if isinstance(sample, np.ndarray) else str(sample.image_path), sample)
            for i, sample in enumerate(samples)]


def _cross_fit_keys(samples: Sequence[Sample | np.ndarray], seed: int) -> set[str]:
    """Keys of the samples to score leave-one-out: all, or the :data:`CROSS_FIT_MAX_IMAGES` with
    the smallest seeded hashes of their identity."""
    keyed = _keyed(samples)
    if len(keyed) > CROSS_FIT_MAX_IMAGES:
        keyed = sorted(keyed, key=lambda item: _uniform_hash(seed, item[1]))[:CROSS_FIT_MAX_IMAGES]
    return {key for key, _ in keyed}


def _map_tensors(function: Any, value: Any) -> Any:
    """``value`` (a tensor, or tuples, named tuples and lists of them) with ``function`` applied to each tensor."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(function, item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(function, item) for item in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (see :func:`_map_tensors`)."""
    found: list[torch.Tensor] = []
    _map_tensors(found.append, value)
    return found


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Images (B, 3, S, S) float in [0, 1] -> uint8 (B, 3, S, S)."""
    return np.rint(np.asarray(images) * 255.0).astype(np.uint8)


def _timed(batches: Iterator[Any], seconds: dict[str, float]) -> Iterator[Any]:
    """Yield from ``batches``, adding the time spent producing them to ``seconds["features"]``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds["features"] += time.perf_counter() - start
        if batch is None:
            return
        yield batch
