"""Saving a fitted model and loading it back: a directory of ``config.json`` and safetensors files
(:mod:`flawmap.io`), loaded without executing anything from it.

A method's fitted state is its ``to_state()`` (JSON values and tensors); every model adds the
fitted values of :data:`FITTED_TYPES` and its calibration images. Models saved in an older format
(``io.READABLE_VERSIONS``) load as they behaved: hyper-parameters added since then take the value
that reproduces the older behaviour (the method's ``former_params``), fitted values added since
then take :data:`FORMER_FITTED`. A tampered or foreign directory is a FlawmapError naming the file
and the problem.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flawmap import io
from flawmap.backbones import create_backbone
from flawmap.calibration import Calibration
from flawmap.errors import FlawmapError
from flawmap.models.calibrators import CALIBRATION_STATE
from flawmap.models.methods import METHODS
from flawmap.tiling import choose_tiling

if TYPE_CHECKING:
    from flawmap.models.base import AnomalyModel

#: JSON types of the fitted values every model saves (:func:`fitted_values`).
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
#: Fitted values added in a format version: version -> their values in a model saved before it.
FORMER_FITTED: dict[int, dict[str, Any]] = {8: {"train_digests_": None, "calibration_history_": []}}
#: Shared hyper-parameters added in a format version whose default is not how models behaved
#: before (as :attr:`AnomalyModel.former_params`): tiling (4) was off before ``tile_size="auto"``.
FORMER_SHARED_PARAMS: dict[int, dict[str, Any]] = {4: {"tile_size": None}}


def save_model(model: AnomalyModel, directory: str | Path) -> Path:
    """Write the fitted ``model`` to ``directory`` atomically (config.json + safetensors, no pickle)."""
    model._check_is_fitted()
    method_fitted, method_tensors = model.to_state()
    groups = {"model": method_tensors, "calibration": {"images": model.calibration_images_}}
    if model.weights is not None:
        groups["backbone"] = model.scorer_.backbone.state_dict()
    document = {
        "method": model.method,
        "params": model.get_params(),  # tuples become JSON lists; load_model turns taps back
        "fitted": {**fitted_values(model), **method_fitted},
        "saved_with": {"device": model.runtime.device, "precision": model.runtime.precision, "torch": torch.__version__},
    }
    return io.save_model_directory(directory, document, groups)


def fitted_values(model: AnomalyModel) -> dict[str, Any]:
    """The fitted values of every method that are not tensors (:data:`FITTED_TYPES`), saved in config.json."""
    values = {name: getattr(model, name) for name in FITTED_TYPES}
    return {**values, "taps_": list(model.taps_), "calibration_": model.calibration_.to_json()}


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
    params = model_class.upgrade_params(dict(config["params"])) if isinstance(config["params"], dict) else config["params"]
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
