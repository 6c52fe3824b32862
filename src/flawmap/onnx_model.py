"""Exported models (``flawmap export``) run by onnxruntime, without torch.

An exported ``.onnx`` file is one graph from images to smoothed anomaly maps and image scores
(see :mod:`flawmap.export`), with what predicting needs besides in its ``metadata_props``:

==================  ===================================================================
key                 value
==================  ===================================================================
flawmap_format      ``"flawmap-onnx"`` (what marks a file as ours)
format_version      ``"1"``
flawmap_version     the flawmap that exported it
method              the method's registered name
image_size          ``S``
threshold           the calibrated image-score threshold
map_low, map_high   the overlays' colour range (median and calibrated maximum normal pixel score)
input_dtype         ``"float32"`` (RGB in [0, 1]) or ``"uint8"`` (RGB in [0, 255])
normalization       how images must be prepared before the graph (text)
batch               ``"dynamic"`` or the fixed batch size
precision           the weights' storage, ``weight_dtype`` of ``flawmap export``: ``"float32"`` or
                    ``"float16"`` (arithmetic is float32 either way; the key keeps its first name)
source_sha256       sha256 of the source model directory (:func:`flawmap.io.model_directory_digest`)
params              the method's hyper-parameters (JSON; ``tile_size`` as the fit resolved ``"auto"``)
exporter            the torch exporter used and torch's version
model_card          the source model's training and calibration record (JSON,
                    :meth:`flawmap.model_card.ModelCard.fitted_record`; absent in older exports)
==================  ===================================================================

:class:`OnnxModel` is a :class:`flawmap.prediction.Predictor`: decoding, batching, resizing to the
original size, tiling (``tile_size`` in ``params``: the graph scores tiles, the shared
:mod:`flawmap.tiling` code cuts and stitches) and the threshold are the same code as for torch models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flawmap.errors import FlawmapError
from flawmap.io import check_format
from flawmap.prediction import Predictor
from flawmap.runtime import Runtime

FORMAT_NAME = "flawmap-onnx"
FORMAT_VERSION = "1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
INPUT_DTYPES = ("float32", "uint8")
#: How weights are stored (``weight_dtype``); the graph computes in float32 either way.
WEIGHT_DTYPES = ("float32", "float16")
#: Metadata keys every exported flawmap model has.
METADATA_KEYS = (
    "flawmap_format", "format_version", "flawmap_version", "method", "image_size", "threshold", "map_low", "map_high",
    "input_dtype", "normalization", "batch", "precision", "source_sha256", "params", "exporter",
)


class OnnxModel(Predictor):
    """An exported model, scored by an onnxruntime session. Made by :func:`load_onnx`.

    Attributes
    ----------
    path : Path
        The ``.onnx`` file.
    metadata : dict of str to str
        Its flawmap metadata (see the module docstring).
    fixed_batch : int or None
        The graph's batch size when it is fixed; batches are run in pieces of it, the last
        one padded.
    """

    def __init__(self, path: Path, session: Any, metadata: dict[str, str], runtime: Runtime) -> None:
        self.path = path
        self.metadata = metadata
        self.method = metadata["method"]
        self.image_size = int(metadata["image_size"])
        params = json.loads(metadata["params"])  # tiling: the graph scores tiles, Predictor stitches them
        self.tile_size_, self.tile_overlap = params.get("tile_size"), params.get("tile_overlap", 0)
        self.threshold_ = float(metadata["threshold"])
        self.map_low_ = float(metadata["map_low"])
        self.map_high_ = float(metadata["map_high"])
        self.fixed_batch = None if metadata["batch"] == "dynamic" else int(metadata["batch"])
        self.runtime = runtime
        self._session = session

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, method={self.method!r}, image_size={self.image_size})"

    def set_runtime(self, runtime: Runtime | None = None, **settings: Any) -> "OnnxModel":
        """Run on another device (``"cpu"``, ``"cuda[:N]"``) or batch size from now on; returns ``self``."""
        runtime = (runtime or self.runtime).replace(**settings)
        _check_precision(self.path, runtime)
        if runtime.device != self.runtime.device:
            self._session = _open_session(self.path, runtime.device)
        self.runtime = runtime
        return self

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters of the model it was exported from."""
        return json.loads(self.metadata["params"])

    def score_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) float32 in [0, 1] to image scores (B,) and maps (B, S, S), float32."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise FlawmapError(
                f"{self.path}: the graph takes images of shape B x {' x '.join(map(str, expected))}, "
                f"got {' x '.join(map(str, images.shape))}"
            )
        if self.metadata["input_dtype"] == "uint8":
            images = np.rint(images * np.float32(255.0)).astype(np.uint8)  # exact: the loader made p / 255
        pieces = [images] if self.fixed_batch is None else _padded_pieces(images, self.fixed_batch)
        maps, scores = [], []
        for piece in pieces:
            piece_maps, piece_scores = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: piece})
            maps.append(piece_maps)
            scores.append(piece_scores)
        n_images = images.shape[0]
        return np.concatenate(scores)[:n_images].astype(np.float32), np.concatenate(maps)[:n_images].astype(np.float32)


def load_onnx(path: str | Path, **runtime_settings: Any) -> OnnxModel:
    """Open an exported flawmap model with onnxruntime.

    ``runtime_settings`` as for :func:`flawmap.load` (``device``: ``"cpu"`` uses the CPU
    provider, ``"cuda[:N]"`` the CUDA provider; ``batch_size``, ``num_workers``, ``progress``).

    Raises
    ------
    FlawmapError
        If onnxruntime is missing, the file is not an ONNX model, has no flawmap metadata, or its
        graph does not match its metadata.
    """
    source = Path(path)
    runtime = Runtime().replace(**runtime_settings)
    _check_precision(source, runtime)
    session = _open_session(source, runtime.device)
    model = OnnxModel(source, session, _flawmap_metadata(source, session), runtime)
    _check_graph(model)
    return model


def _check_precision(path: Path, runtime: Runtime) -> None:
    if runtime.precision != "auto":
        raise FlawmapError(
            f"{path}: an exported graph computes in float32 (its weights' storage was chosen at export, --weight-dtype); "
            f"precision {runtime.precision!r} (the arithmetic) applies to model directories only"
        )


def _open_session(path: Path, device: str) -> Any:
    """An onnxruntime session on ``device``'s provider."""
    try:
        import onnxruntime
    except ImportError:
        raise FlawmapError('running an exported model needs onnxruntime: pip install "flawmap[runtime]"') from None
    providers = _providers(device, onnxruntime.get_available_providers())
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-node placement notes on stderr
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own bare Exception subclasses
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FlawmapError(f"{path}: not a readable ONNX model ({first_line})") from None


def _providers(device: str, available: list[str]) -> list[Any]:
    """onnxruntime providers for ``device``: ``cpu``, or ``cuda[:N]`` (then the CPU as fallback)."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    if kind == "cuda" and (not index or index.isdigit()):
        if "CUDAExecutionProvider" not in available:
            raise FlawmapError(
                f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu); use --device cpu"
            )
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise FlawmapError(f"device {device!r}: an exported model runs on cpu or cuda[:N]")


def _flawmap_metadata(path: Path, session: Any) -> dict[str, str]:
    """The flawmap metadata of a session's model; FlawmapError if the file is not ours."""
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    check_format(
        path, metadata, ("flawmap_format", FORMAT_NAME), (FORMAT_VERSION,), METADATA_KEYS,
        not_ours="not a flawmap model (no flawmap metadata); make one with `flawmap export MODEL_DIR`",
        redo="export the model again",
    )
    return metadata


def _check_graph(model: OnnxModel) -> None:
    """The graph's one input and two outputs are the ones its metadata describes."""
    inputs = model._session.get_inputs()
    outputs = tuple(output.name for output in model._session.get_outputs())
    size, batch = model.image_size, model.fixed_batch
    input_type = "tensor(uint8)" if model.metadata["input_dtype"] == "uint8" else "tensor(float)"
    matches = (
        len(inputs) == 1
        and (inputs[0].name, inputs[0].type, list(inputs[0].shape[1:])) == (INPUT_NAME, input_type, [3, size, size])
        and (batch is None) == isinstance(inputs[0].shape[0], str)
        and batch in (None, inputs[0].shape[0])
        and outputs == OUTPUT_NAMES
    )
    if not matches:
        found = ", ".join(f"{graph_input.name} {graph_input.type} {graph_input.shape}" for graph_input in inputs)
        raise FlawmapError(
            f"{model.path}: the graph's inputs ({found}) or outputs {list(outputs)} do not match its metadata "
            f"(images {input_type} [{model.metadata['batch']}, 3, {size}, {size}] -> {list(OUTPUT_NAMES)})"
        )


def _padded_pieces(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """``images`` (B, ...) in pieces of exactly ``batch`` rows, the last padded with zeros."""
    n_padding = -images.shape[0] % batch
    padded = np.concatenate([images, np.zeros((n_padding, *images.shape[1:]), dtype=images.dtype)])
    return [padded[start : start + batch] for start in range(0, padded.shape[0], batch)]
