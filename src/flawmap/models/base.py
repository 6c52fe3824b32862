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

Fitting holds out a share of the normal images (chosen by a hash of each image's identity, so the
same images are held out whether they arrive in one fit or several) and calibrates the score
threshold on every held-out image of every fit so far, so ``is_anomalous`` needs no defect
images. The held-out images are kept in the model (``uint8``, at the network size) for that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from flawmap import io, postprocess
from flawmap.backbones import Backbone, create_backbone
from flawmap.data import Dataset, Sample, open_dataset, samples_from_paths
from flawmap.errors import FlawmapError
from flawmap.prediction import ImageInput, Predictor
from flawmap.registry import Registry
from flawmap.runtime import Runtime, autocast

METHODS: Registry[type["AnomalyModel"]] = Registry("method")


class PatchScores(NamedTuple):
    """What a scorer returns: ``patch_scores`` (B, h, w) and, for methods that define their own,
    ``image_scores`` (B,); None means "the maximum of the smoothed anomaly map"."""

    patch_scores: torch.Tensor
    image_scores: torch.Tensor | None = None


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
        Images are resized to ``image_size x image_size`` for the network.
    sigma : float
        Gaussian smoothing of the anomaly map, in input pixels.
    calibration_fraction : float
        Share of the normal training images held out to calibrate the threshold.
    false_alarm_rate : float
        Target share of normal images flagged as anomalous by the threshold.
    random_state : int
        Seed for every random choice in fitting.

    Attributes
    ----------
    runtime : Runtime
        How the model runs here (device, precision, ...); not a hyper-parameter, never saved.
    """

    method: ClassVar[str] = ""
    #: Whether a fitted model can learn from more images (``partial_fit``).
    supports_partial_fit: ClassVar[bool] = True
    #: Small hyper-parameters for a fast smoke fit at 64 px (tests and examples).
    quick_params: ClassVar[dict[str, Any]] = {}

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    taps: tuple[str, ...] | None = None
    image_size: int = 256
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
        on the held-out images of every fit so far.
        """
        first = not self.is_fitted()
        if not first and not self.supports_partial_fit:
            raise FlawmapError(f"method {self.method!r} cannot learn from more images; fit a new model on all of them")
        self._validate_params()
        fit_samples, calibration_samples = self._split_calibration(training_samples(images), first)
        start = time.perf_counter()
        if first:
            backbone = create_backbone(self.backbone, self.weights)
            self.taps_ = tuple(self.taps or backbone.default_taps)
            self.scorer_ = self._new_scorer(backbone, self.taps_)
            self.n_train_images_, self.n_fits_ = 0, 0
            self.calibration_images_ = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        self.set_runtime()
        seconds = {"features": 0.0}
        if fit_samples:
            self._learn(_timed(self._embedded_batches(fit_samples, skip_invalid), seconds))
            self.set_runtime()  # new fitted tensors follow the device and precision
        learned = time.perf_counter()
        self.n_train_images_ += len(fit_samples)
        self.n_fits_ += 1
        self._calibrate(calibration_samples, skip_invalid)
        seconds["method"] = learned - start - seconds["features"]
        seconds["calibration"] = time.perf_counter() - learned
        self.fit_seconds_ = seconds
        return self

    def score_images(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) in [0, 1] (array or tensor) to image scores (B,) and smoothed maps
        (B, S, S), float32 numpy: ``scorer_`` plus the shared postprocessing."""
        if not hasattr(self, "scorer_"):
            self._check_is_fitted()
        with torch.inference_mode():
            scored = self.scorer_(torch.as_tensor(images).to(self.runtime.torch_device))
            maps = postprocess.anomaly_maps(scored.patch_scores, self.image_size, self.sigma)
            image_scores = maps.amax(dim=(1, 2)) if scored.image_scores is None else scored.image_scores.cpu()
        return image_scores.float().numpy(), maps.numpy()

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

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The method's fitted state: JSON values (keys ending in ``_``) and tensors."""
        raise NotImplementedError

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`to_state` returned into ``scorer_`` and the model."""
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
        if self.sigma < 0.0:
            raise FlawmapError(f"sigma must be >= 0, got {self.sigma}")
        self._validate_method_params()

    def _split_calibration(
        self, samples: list[Sample | np.ndarray], first: bool
    ) -> tuple[list[Sample | np.ndarray], list[Sample | np.ndarray]]:
        """Hold out about ``calibration_fraction`` of the samples, chosen by a seeded hash of each
        image's identity (its folder and file name, or an array's pixels): the same images are
        held out whether they come in one fit or in several, and wherever the dataset lies. A
        first fit holds out at least one and keeps one."""
        if first and len(samples) < 2:
            raise FlawmapError(f"need at least 2 training images (one is held out for calibration), got {len(samples)}")
        if not samples:
            raise FlawmapError("no training images given")
        draws = np.array([_uniform_hash(self.random_state, sample) for sample in samples])
        held_out = draws < self.calibration_fraction
        if first and not held_out.any():
            held_out[draws.argmin()] = True
        if first and held_out.all():
            held_out[draws.argmax()] = False
        fit_samples = [sample for sample, out in zip(samples, held_out) if not out]
        return fit_samples, [sample for sample, out in zip(samples, held_out) if out]

    def _embedded_batches(self, samples: Sequence[Sample | np.ndarray], skip_invalid: bool) -> Iterator[Any]:
        """The scorer's features of each batch, computed in inference mode (yielded outside it)."""
        for batch in self._batches(samples, skip_invalid, "extracting features"):
            with torch.inference_mode():
                features = self.scorer_.embed(torch.from_numpy(batch.images).to(self.runtime.torch_device))
            yield features

    def _calibrate(self, new_samples: Sequence[Sample | np.ndarray], skip_invalid: bool) -> None:
        """Add ``new_samples`` to the held-out images; threshold and display range from all of them."""
        new_images = [
            torch.from_numpy(batch.images).mul(255.0).round_().to(torch.uint8)
            for batch in self._batches(new_samples, skip_invalid, "calibrating")
        ]
        self.calibration_images_ = torch.cat([self.calibration_images_, *new_images])
        if self.calibration_images_.shape[0] == 0:
            raise FlawmapError("no valid calibration image left: every held-out image was skipped")
        image_scores, map_maxima, map_medians = [], [], []
        for start in range(0, self.calibration_images_.shape[0], self.runtime.batch_size):
            images = self.calibration_images_[start : start + self.runtime.batch_size].float().div_(255.0)
            scores, maps = self.score_images(images)
            maps = torch.from_numpy(maps)
            image_scores.append(torch.from_numpy(scores))
            map_maxima.append(maps.amax(dim=(1, 2)))
            map_medians.append(maps.flatten(1).median(dim=1).values)
        normal_scores = torch.cat(image_scores).numpy()
        self.threshold_ = postprocess.normal_quantile_threshold(normal_scores, self.false_alarm_rate)
        self.map_low_ = float(torch.cat(map_medians).median())
        self.map_high_ = postprocess.normal_quantile_threshold(torch.cat(map_maxima).numpy(), self.false_alarm_rate)
        self.calibration_scores_ = normal_scores.tolist()

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
            "calibration_scores_": self.calibration_scores_,
            "fit_seconds_": self.fit_seconds_,
        }


def load_model(directory: str | Path, **runtime_settings: Any) -> AnomalyModel:
    """Load a model directory written by :meth:`AnomalyModel.save`; never executes code from it.

    ``runtime_settings`` (``device``, ``precision``, ``batch_size``, ``num_workers``,
    ``progress``) choose how it runs here; where it was fitted does not matter.
    """
    source = Path(directory)
    config, files = io.read_model_directory(source)
    model_class = METHODS.get(config["method"])
    params = dict(config["params"])
    if params.get("taps") is not None:
        params["taps"] = tuple(params["taps"])
    if "backbone" in files:
        params["weights"] = str(files["backbone"])
    try:
        model = model_class(**params)
    except TypeError as error:
        raise FlawmapError(f"{source / io.CONFIG_FILE}: parameters do not match method {config['method']!r}: {error}") from None
    model.runtime = model.runtime.replace(**runtime_settings)
    fitted = dict(config["fitted"])
    model.taps_ = tuple(fitted.pop("taps_"))
    for name in ("n_train_images_", "n_fits_", "threshold_", "map_low_", "map_high_", "calibration_scores_", "fit_seconds_"):
        setattr(model, name, fitted.pop(name))
    model.calibration_images_ = io.read_tensor_file(files["calibration"])["images"]
    model.scorer_ = model._new_scorer(create_backbone(model.backbone, model.weights), model.taps_)
    try:
        model.from_state(fitted, io.read_tensor_file(files["model"]))
    except (KeyError, RuntimeError) as error:
        raise FlawmapError(f"{files['model']}: tensors do not match the {config['method']} configuration ({error})") from None
    return model.set_runtime()


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
    return [sample for item in images for sample in training_samples(item)]


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


def _timed(batches: Iterator[Any], seconds: dict[str, float]) -> Iterator[Any]:
    """Yield from ``batches``, adding the time spent producing them to ``seconds["features"]``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds["features"] += time.perf_counter() - start
        if batch is None:
            return
        yield batch
