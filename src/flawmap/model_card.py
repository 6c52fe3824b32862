"""One description of a fitted model: ``flawmap info``, ``serve``'s ``GET /v1/model`` and the report's model card.

:func:`model_card` reads a loaded :class:`~flawmap.prediction.Predictor` (a model directory run by
torch, or an exported graph run by onnxruntime) into a :class:`ModelCard`. It has two renderings,
both from the same fields: :meth:`ModelCard.to_json` (``info --json``, ``/v1/model``) and
:meth:`ModelCard.facts`, labelled lines of text (what ``info`` prints and the HTML report's
table shows). An exported graph carries its source model's training and calibration record in its
metadata (:data:`CARD_METADATA_KEY`, written by ``flawmap export``), so it is described like the
directory it came from; a graph exported before that record existed shows those values as not
recorded.

This module does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flawmap import io
from flawmap.calibration import raised_rate_note
from flawmap.onnx_model import OnnxModel
from flawmap.prediction import Predictor

#: The ONNX metadata key holding the source model's :meth:`ModelCard.fitted_record`.
CARD_METADATA_KEY = "model_card"
#: What a fact the model does not record reads.
NOT_RECORDED = "not recorded"
#: The card's training and calibration values: what a torch model knows first hand, and an
#: export carries in its metadata.
_FITTED_RECORD = (
    "tiling_reason", "n_train_images", "n_fits", "fit_seconds", "false_alarm_rate", "requested_false_alarm_rate",
    "smallest_supported_false_alarm_rate", "threshold_interval_90", "expected_false_alarm_rate_range",
    "calibration", "estimator", "n_normal_scores", "pixel_threshold_interval_90", "expected_images_with_regions_range",
    "n_training_digests", "calibration_history",
)


@dataclass(frozen=True)
class ModelCard:
    """What a fitted model is, how it was trained and calibrated, and where it comes from.

    Attributes
    ----------
    method, params : the registered method and its hyper-parameters (JSON values).
    backbone : the feature extractor's name, or None for a method without one.
    image_size : ``S``: images (or tiles) go to the network at ``S x S``.
    tile_size, tile_overlap : the tiling the fit chose (:mod:`flawmap.tiling`); ``tile_size`` None resizes whole images.
    tiling_reason : why the fit tiled or resized (``tile_size="auto"``: from the images' sizes); None if not recorded.
    kind : ``"model directory"``, ``"exported graph"``, or ``"torch model"`` (its directory not given).
    path : where it was loaded from, when known.
    model_hash : sha256 of the model directory (for a graph: of the directory it was exported from).
    format_version, saved_by_flawmap : the file format's version and the flawmap that wrote it.
    n_train_images, n_fits, fit_seconds : training images (tiles of a tiled model), fits, seconds of the last fit.
    threshold, false_alarm_rate : the image-score threshold and its target share of normal images flagged.
    requested_false_alarm_rate, smallest_supported_false_alarm_rate : the rate asked for when it was raised to the
        smallest one the normal scores support (else None), and that smallest rate (None in older models).
    threshold_interval_90, expected_false_alarm_rate_range : its 90 % bootstrap interval and the rates it implies.
    calibration, estimator, n_normal_scores : where its normal scores came from, the quantile estimator, how many.
    pixel_threshold : the map level above which regions are drawn;
    pixel_threshold_interval_90, expected_images_with_regions_range : its interval and the share of
        normal images expected to show any region.
    overlay_scale : ``(low, high)`` of the overlays' colour scale (:mod:`flawmap.report`).
    n_training_digests : content digests of the training images (``calibrate`` refuses those images).
    calibration_history : earlier calibrations (threshold, false-alarm rate, source), oldest first.
    export : an exported graph's ``batch``, ``input_dtype``, ``weight_dtype`` and ``exporter``; None for a directory.

    Values a model does not record (an old export's training, say) are None.
    """

    method: str
    params: dict[str, Any]
    backbone: str | None
    image_size: int
    tile_size: int | None
    tile_overlap: int
    tiling_reason: str | None
    kind: str
    path: str | None
    model_hash: str | None
    format_version: str | None
    saved_by_flawmap: str | None
    n_train_images: int | None
    n_fits: int | None
    fit_seconds: float | None
    threshold: float
    false_alarm_rate: float | None
    requested_false_alarm_rate: float | None
    smallest_supported_false_alarm_rate: float | None
    threshold_interval_90: list[float] | None
    expected_false_alarm_rate_range: list[float] | None
    calibration: str | None
    estimator: str | None
    n_normal_scores: int | None
    pixel_threshold: float
    pixel_threshold_interval_90: list[float] | None
    expected_images_with_regions_range: list[float] | None
    overlay_scale: list[float]
    n_training_digests: int | None
    calibration_history: list[dict[str, Any]] | None
    export: dict[str, str] | None

    def to_json(self) -> dict[str, Any]:
        """The card as a JSON-ready dict, one key per attribute."""
        return asdict(self)

    def fitted_record(self) -> dict[str, Any]:
        """The training and calibration values, which an export carries in its metadata."""
        return {name: getattr(self, name) for name in _FITTED_RECORD}

    def facts(self) -> list[tuple[str, str]]:
        """``(label, text)`` lines: ``info`` prints them as ``label: text``, the report as a table."""
        facts = [
            ("method", self.method),
            ("model", self._origin()),
            ("model hash", _or_not_recorded(self.model_hash)),
            ("backbone", self.backbone or "none"),
            ("image size", f"{self.image_size} x {self.image_size} px"),
            ("tiling", self._tiling()),
            ("parameters", ", ".join(f"{name}={value}" for name, value in self.params.items())),
            ("training images", self._training()),
            ("fit time", NOT_RECORDED if self.fit_seconds is None else f"{self.fit_seconds:.1f} s"),
            ("threshold", f"{self.threshold:.6g}" + _interval(self.threshold_interval_90)),
            ("false-alarm rate", self._false_alarm_rate()),
            ("calibrated on", self._calibrated_on()),
            ("pixel threshold", self._pixel_threshold()),
            ("overlay colour scale", f"{self.overlay_scale[0]:.6g} .. {self.overlay_scale[1]:.6g} (median and pixel threshold of normal maps)"),
            ("calibration images", self._calibration_images()),
            ("training image digests", self._digests()),
            ("earlier calibrations", self._history()),
        ]
        if self.export is not None:
            export = self.export
            facts.append(("export", f"batch {export['batch']}, {export['input_dtype']} input, {export['weight_dtype']} weights; {export['exporter']}"))
        return facts

    def to_text(self) -> str:
        """The facts as ``label: text`` lines (``flawmap info``)."""
        return "\n".join(f"{label}: {text}" for label, text in self.facts())

    def _origin(self) -> str:
        if self.path is None:
            return f"{self.kind} (its directory not given)"
        written = f", written by flawmap {self.saved_by_flawmap}" if self.saved_by_flawmap else ""
        return f"{self.kind} {self.path} (format {self.format_version}{written})"

    def _tiling(self) -> str:
        if self.tile_size is None:
            chosen = f"none: each image is resized to {self.image_size} x {self.image_size}"
        else:
            chosen = f"{self.tile_size} px tiles at native resolution, overlapping by at least {self.tile_overlap} px"
        return chosen + (f" ({self.tiling_reason})" if self.tiling_reason else "")

    def _training(self) -> str:
        if self.n_train_images is None:
            return NOT_RECORDED
        unit = "tiles" if self.tile_size is not None else "images"
        return f"{self.n_train_images} {unit} in {self.n_fits} fit(s)"

    def _false_alarm_rate(self) -> str:
        if self.false_alarm_rate is None:
            return NOT_RECORDED
        expected = self.expected_false_alarm_rate_range
        text = f"target {self.false_alarm_rate:g}" + (f", expected {expected[0]:.3g} .. {expected[1]:.3g}" if expected else "")
        text += raised_rate_note(self.requested_false_alarm_rate, self.n_normal_scores)
        if self.smallest_supported_false_alarm_rate is not None:
            text += f"; smallest rate {self.n_normal_scores} normal scores support: {self.smallest_supported_false_alarm_rate:.3g}"
        return text

    def _calibrated_on(self) -> str:
        if self.calibration is None:
            return NOT_RECORDED
        return f"{self.calibration}; {self.estimator} quantile of {self.n_normal_scores} normal scores"

    def _pixel_threshold(self) -> str:
        text = f"{self.pixel_threshold:.6g}" + _interval(self.pixel_threshold_interval_90)
        expected = self.expected_images_with_regions_range
        return text + (f": good images with any region expected {expected[0]:.3g} .. {expected[1]:.3g}" if expected else "")

    def _calibration_images(self) -> str:
        if self.n_normal_scores is None:
            return NOT_RECORDED
        return f"the threshold rests on {self.n_normal_scores} distinct normal images"

    def _digests(self) -> str:
        if self.n_train_images is None:
            return NOT_RECORDED
        if self.n_training_digests is None:
            return "no content digests recorded (saved by an older flawmap): calibrate cannot refuse them"
        return f"{self.n_training_digests} content digests recorded; calibrate refuses them"

    def _history(self) -> str:
        if self.calibration_history is None:
            return NOT_RECORDED
        if not self.calibration_history:
            return "none"
        lines = [f"{len(self.calibration_history)}, `flawmap calibrate MODEL_DIR --restore` puts back the first:"]
        for state in reversed(self.calibration_history):
            lines.append(f"  threshold {state['threshold']:.6g} at false-alarm rate {state['false_alarm_rate']:g}: {state['calibration']}")
        return "\n".join(lines)


def model_card(model: Predictor, path: str | Path | None = None) -> ModelCard:
    """The card of ``model``; ``path``: the model directory it was loaded from and still matches
    (its format version and hash then join the card). An exported graph knows its own path. The
    tiling is the one the fit chose (``tile_size_``; an export records it in its ``tile_size``)."""
    params = model.get_params()
    shared = {
        "method": model.method, "params": params, "backbone": params.get("backbone"), "image_size": model.image_size,
        "tile_size": model.tile_size_, "tile_overlap": params.get("tile_overlap", 0), "threshold": model.threshold_,
        "pixel_threshold": model.map_high_, "overlay_scale": [model.map_low_, model.map_high_],
    }
    if isinstance(model, OnnxModel):
        return ModelCard(**shared, **_exported(model))
    return ModelCard(**shared, **_directory(path), **_fitted(model))


def _exported(model: OnnxModel) -> dict[str, Any]:
    """What an exported graph's metadata says (the source's fitted record, if it carries one)."""
    metadata = model.metadata
    recorded = json.loads(metadata.get(CARD_METADATA_KEY, "{}"))
    return {
        "kind": "exported graph", "path": str(model.path), "model_hash": metadata["source_sha256"],
        "format_version": metadata["format_version"], "saved_by_flawmap": metadata["flawmap_version"],
        **{name: recorded.get(name) for name in _FITTED_RECORD},
        "export": {
            "batch": metadata["batch"], "input_dtype": metadata["input_dtype"],
            "weight_dtype": metadata["precision"], "exporter": metadata["exporter"],
        },
    }


def _directory(path: str | Path | None) -> dict[str, Any]:
    """Where a torch model comes from: its directory's format header and hash, when given."""
    if path is None:
        return {"kind": "torch model", "path": None, "model_hash": None, "format_version": None, "saved_by_flawmap": None, "export": None}
    document, _ = io.read_model_directory(path)
    return {
        "kind": "model directory", "path": str(path), "model_hash": io.model_directory_digest(path),
        "format_version": str(document["format_version"]), "saved_by_flawmap": document.get("flawmap_version"), "export": None,
    }


def _fitted(model: Any) -> dict[str, Any]:
    """A fitted torch model's training and calibration record (:data:`_FITTED_RECORD`)."""
    calibration, pixel = model.calibration_, model.pixel_calibration()
    return {
        "tiling_reason": model.tiling_reason_,
        "n_train_images": model.n_train_images_,
        "n_fits": model.n_fits_,
        "fit_seconds": sum(model.fit_seconds_.values()) if model.fit_seconds_ else None,
        "false_alarm_rate": calibration.false_alarm_rate,
        "requested_false_alarm_rate": calibration.requested_false_alarm_rate,
        "smallest_supported_false_alarm_rate": calibration.smallest_supported_rate,
        "threshold_interval_90": list(calibration.threshold_interval),
        "expected_false_alarm_rate_range": list(calibration.false_alarm_rate_interval),
        "calibration": calibration.source,
        "estimator": calibration.estimator,
        "n_normal_scores": calibration.n_scores,
        "pixel_threshold_interval_90": list(pixel.threshold_interval),
        "expected_images_with_regions_range": list(pixel.false_alarm_rate_interval),
        "n_training_digests": None if model.train_digests_ is None else len(model.train_digests_),
        "calibration_history": [
            {"threshold": state["threshold_"], "false_alarm_rate": state["false_alarm_rate"], "calibration": state["calibration_"]["source"]}
            for state in model.calibration_history_
        ],
    }


def _interval(bounds: list[float] | None) -> str:
    return "" if bounds is None else f" (90% interval {bounds[0]:.6g} .. {bounds[1]:.6g})"


def _or_not_recorded(value: str | None) -> str:
    return NOT_RECORDED if value is None else value

