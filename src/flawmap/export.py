"""Export a fitted model to one ONNX graph, from images to smoothed anomaly maps and image scores.

The graph is the method's scorer (``model.scorer_``, the one inference path of every method)
followed by the model's :class:`~flawmap.postprocessor.PostProcessor`, the very module prediction
runs: upsampling and smoothing as two matrix products, and the image score (the scorer's own, or
the map's maximum).
Nearest-neighbour searches are matrix products and reductions (:mod:`flawmap.search`; one chunk
while exporting), SFR's solver runs its fixed number of iterations, so the graph has no custom
operators. Each search index among the scorer's submodules is exported in its traceable form
(:meth:`flawmap.search.SearchIndex.for_export`): a bank searched with faiss
(:mod:`flawmap.search_faiss`) as an exact search over the vectors its index stores (faiss-ivfpq
keeps them for its exact re-rank), so the graph computes the exact neighbours the approximate
index only estimates.

The exporter is ``torch.export`` (non-strict) and ``torch.onnx``'s dynamo translation, in float32.
A dynamic batch dimension is asked of ``torch.export`` as ``Dim.DYNAMIC``; a method whose scorer
fixes the batch size while tracing (SPADE searches each image's own gallery in a loop over the
batch) declares ``traits.export_batch = "fixed"`` and exports with a fixed ``batch`` only.

Before anything is written the graph is run with onnxruntime on the model's held-out calibration
images and compared with the torch model (maps within :data:`MAP_TOLERANCE` of the maps' range,
scores within :data:`SCORE_TOLERANCE` relative); then the file is written under a temporary name
and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flawmap import io
from flawmap._version import __version__
from flawmap.deprecation import renamed
from flawmap.errors import FlawmapError
from flawmap.loading import EXPORT_FILE
from flawmap.model_card import CARD_METADATA_KEY, model_card
from flawmap.outputs import check_replaceable
from flawmap.models.base import AnomalyModel
from flawmap.models.scorer import Scorer
from flawmap.models.persistence import load_model
from flawmap.onnx_model import (
    FORMAT_NAME, FORMAT_VERSION, INPUT_DTYPES, INPUT_NAME, OUTPUT_NAMES, WEIGHT_DTYPES, load_onnx,
)
from flawmap.postprocessor import PostProcessor
from flawmap.search import export_searches

#: ``weight_dtype="float16"`` stores float32 weights of at least this many elements as float16.
FLOAT16_MIN_ELEMENTS = 1024
#: Largest float16 value; tensors beyond it stay float32.
FLOAT16_MAX = 65504.0
#: Export-time check: largest map difference, as a share of the torch maps' range, per weight dtype.
MAP_TOLERANCE = {"float32": 1e-3, "float16": 2e-2}
#: Export-time check: largest relative image-score difference, per weight dtype.
SCORE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
#: Calibration images the export-time check runs (at most).
CHECK_IMAGES = 4
#: What exporting needs besides torch (the ``flawmap[export]`` extra).
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: The export's steps, shown one after the other by its progress bar (seconds each on a CPU).
EXPORT_STEPS = ("tracing (torch.export)", "translating to ONNX", "checking with onnxruntime")


class ExportGraph(nn.Module):
    """A scorer plus its model's post-processor: images -> (maps (B, S, S), image scores (B,)).

    Parameters
    ----------
    scorer : Scorer
        A fitted method's ``scorer_`` (float32, on the CPU).
    postprocessor : PostProcessor
        The model's ``postprocessor()``.
    uint8_input : bool
        Take uint8 RGB in [0, 255] (divided by 255 inside) instead of float32 in [0, 1].
    """

    def __init__(self, scorer: Scorer, postprocessor: PostProcessor, uint8_input: bool) -> None:
        super().__init__()
        self.scorer = scorer
        self.postprocessor = postprocessor
        self.uint8_input = uint8_input

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) -> smoothed maps (B, S, S) and image scores (B,), float32."""
        if self.uint8_input:
            images = images.float() / 255.0
        scored = self.scorer(images)
        return self.postprocessor(scored.patch_scores, scored.image_scores)


def export_onnx(
    model_dir: str | Path,
    out: str | Path | None = None,
    *,
    opset: int | None = None,
    batch: int | str = "dynamic",
    weight_dtype: str = "float32",
    input_dtype: str = "float32",
    force: bool = False,
    progress: bool = False,
    precision: str | None = None,
) -> Path:
    """Export the model saved in ``model_dir`` to the ONNX file ``out``; returns its path.

    Parameters
    ----------
    model_dir : path
        A model directory (``model.save``).
    out : path, optional
        The ``.onnx`` file to write (replaced if it exists). Default ``model_dir/model.onnx``,
        which ``flawmap.load(model_dir, backend="onnx")`` runs.
    opset : int, optional
        ONNX opset of the graph; None uses the exporter's default.
    batch : "dynamic" or int
        A graph for any batch size, or for exactly this many images.
    weight_dtype : {"float32", "float16"}
        How weights are stored: ``"float16"`` stores the larger weights and memory banks as float16 (about half the
        file); the graph still computes in float32, so the maps move by about 1e-3 relative.
    input_dtype : {"float32", "uint8"}
        The graph's input: RGB float32 in [0, 1], or uint8 in [0, 255].
    force : bool
        Replace an existing ``out`` that is not a graph flawmap exported (:mod:`flawmap.outputs`).
    progress : bool
        Show a progress bar over the export's steps (:data:`EXPORT_STEPS`, on stderr).
    precision : the former name of ``weight_dtype`` (FutureWarning).

    Raises
    ------
    FlawmapError
        Bad arguments, a directory that is not a fitted model, a method that cannot be
        exported as asked, or an exported graph that does not reproduce the torch model.
    """
    weight_dtype = renamed("precision=", precision, "weight_dtype=", weight_dtype, "float32")
    _check_arguments(batch, weight_dtype, input_dtype, opset)
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise FlawmapError(f'exporting needs {", ".join(missing)}: pip install "flawmap[torch,export]"')
    source_sha256 = io.model_directory_digest(model_dir)
    target = Path(model_dir) / EXPORT_FILE if out is None else Path(out)
    if target.is_dir():
        raise FlawmapError(f"{target}: is a directory; give the .onnx file to write")
    if not target.parent.is_dir():
        raise FlawmapError(f"{target.parent}: folder does not exist")
    check_replaceable(target, folder=False, force=force, ours=is_exported_graph, what="a graph flawmap exported")
    model = load_model(model_dir, device="cpu", precision="float32", batch_size=CHECK_IMAGES, num_workers=1)
    reason = model.scorer_.export_error()
    if reason is not None:
        raise FlawmapError(f"{model_dir}: {reason}")
    if batch == "dynamic" and model.traits.export_batch == "fixed":
        raise FlawmapError(
            f"{model.method} cannot be exported with a dynamic batch: its scorer's code depends on the batch size "
            "(tracing fixes it); export it with a fixed batch, e.g. --batch 1"
        )
    export_searches(model.scorer_)  # a faiss bank exports as an exact search over its stored vectors
    graph = ExportGraph(model.scorer_, model.postprocessor(), input_dtype == "uint8").eval()
    with tqdm(total=len(EXPORT_STEPS), unit="step", disable=not progress, leave=False, file=sys.stderr) as steps:
        payload = _with_metadata(_to_onnx(graph, model, batch, opset, steps), model, weight_dtype, batch, input_dtype, source_sha256)
        _check_parity(payload, model, weight_dtype, target, steps)
    io.write_atomically(target, payload)
    return target


def _with_metadata(proto, model: AnomalyModel, weight_dtype: str, batch: int | str, input_dtype: str, source_sha256: str) -> bytes:
    """``proto`` (float16 storage where asked) with flawmap's metadata, serialised."""
    if weight_dtype == "float16":
        store_float16(proto)
    exporter = f"torch.export (non-strict) + torch.onnx dynamo, torch {torch.__version__}"
    metadata = {
        "flawmap_format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "flawmap_version": __version__,
        "method": model.method,
        "image_size": str(model.image_size),
        "threshold": repr(model.threshold_),
        "map_low": repr(model.map_low_),
        "map_high": repr(model.map_high_),
        "input_dtype": input_dtype,
        "normalization": _normalization_note(model, input_dtype),
        "batch": str(batch),
        "precision": weight_dtype,
        "source_sha256": source_sha256,
        "params": json.dumps({**model.get_params(), "tile_size": model.tile_size_}),  # "auto" as the fit resolved it
        "exporter": exporter,
        CARD_METADATA_KEY: json.dumps(model_card(model).fitted_record()),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def is_exported_graph(path: Path) -> bool:
    """Whether ``path`` is an ONNX file with flawmap's metadata (one ``export_onnx`` wrote)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises DecodeError and others for a file that is not ONNX
        return False
    return any(entry.key == "flawmap_format" and entry.value == FORMAT_NAME for entry in proto.metadata_props)


def store_float16(proto) -> None:
    """Store the float32 initializers of ``proto`` (an onnx ModelProto) that have at least
    :data:`FLOAT16_MIN_ELEMENTS` elements, all within float16 range, as float16, each followed
    by a Cast back to float32 under its old name (onnxruntime folds the casts when it loads)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != TensorProto.FLOAT or int(np.prod(initializer.dims)) < FLOAT16_MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(initializer)
        if not np.all(np.abs(values) <= FLOAT16_MAX):
            continue
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.float16"))
        casts.append(helper.make_node("Cast", [f"{name}.float16"], [name], to=TensorProto.FLOAT))
    for cast in reversed(casts):
        graph.node.insert(0, cast)


def _check_arguments(batch: int | str, weight_dtype: str, input_dtype: str, opset: int | None) -> None:
    if batch != "dynamic" and not (isinstance(batch, int) and batch >= 1):
        raise FlawmapError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise FlawmapError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if input_dtype not in INPUT_DTYPES:
        raise FlawmapError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if opset is not None and opset < 18:
        raise FlawmapError(f"opset must be at least 18 (the dynamo exporter's minimum), got {opset}")


def _step(steps: tqdm, index: int) -> None:
    """Show :data:`EXPORT_STEPS` ``[index]`` as the one in progress (``steps`` counts those done)."""
    steps.update(index - steps.n)
    steps.set_description(f"exporting: {EXPORT_STEPS[index]}")


def _to_onnx(graph: ExportGraph, model: AnomalyModel, batch: int | str, opset: int | None, steps: tqdm):
    """The ONNX ModelProto of ``graph``, traced with ``torch.export`` at the requested batch."""
    size = model.image_size
    example_batch = 2 if batch == "dynamic" else batch  # 0 and 1 would be specialised
    if graph.uint8_input:
        example = torch.randint(0, 256, (example_batch, 3, size, size), dtype=torch.uint8)
    else:
        example = torch.rand(example_batch, 3, size, size)
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}} if batch == "dynamic" else None
    with torch.no_grad(), _quiet_exporter():
        graph(example)  # builds the post-processor's operators from real tensors: constants of the graph
        _step(steps, 0)
        exported = torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes, strict=False)
        _step(steps, 1)
        program = torch.onnx.export(
            exported, dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=opset, external_data=False, verbose=False,
        )
    return program.model_proto


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines, its notes about optional packages and torch's
    deprecation notes to itself."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _normalization_note(model: AnomalyModel, input_dtype: str) -> str:
    values = "uint8 RGB in [0, 255]" if input_dtype == "uint8" else "float32 RGB in [0, 1]"
    if model.tile_size_ is None:
        images = "each image resized (squashed, bilinear, Pillow) to that size"
        maps = "resize it to the original image size. score: B float32"
    else:
        images = (
            f"each a {model.tile_size_} px tile of an image at native resolution (overlap >= {model.tile_overlap} px, "
            "flawmap.tiling), resized to that size if different"
        )
        maps = "stitch the tiles' maps with flawmap.tiling. score: B float32 per tile; the image's is the tiles' maximum"
    return (
        f"images: B x 3 x {model.image_size} x {model.image_size} {values}, {images}; the graph applies the "
        f"backbone's mean/std normalisation itself. anomaly_map: B x {model.image_size} x {model.image_size} "
        f"float32, upsampled and Gaussian-smoothed (sigma {model.sigma}); {maps}; anomalous if > threshold."
    )


def _check_parity(payload: bytes, model: AnomalyModel, weight_dtype: str, target: Path, steps: tqdm) -> None:
    """Run the serialised graph on the model's calibration images and compare with the torch model."""
    _step(steps, 2)
    probe = target.with_name(f".{target.name}.check")  # removed below, whatever happens
    io.write_atomically(probe, payload)
    try:
        exported = load_onnx(probe, batch_size=CHECK_IMAGES, num_workers=1)
        # mirrored: a cross-fitted model keeps training images, whose own patches sit in its bank at
        # distance ~0, where the square root of a distance amplifies rounding differences
        images = model.calibration_images_[:CHECK_IMAGES].flip(-1).float().div_(255.0).numpy()
        torch_scores, torch_maps = model.score_images(images)
        onnx_scores, onnx_maps = exported.score_images(images)
    finally:
        probe.unlink(missing_ok=True)
    steps.update()
    map_range = max(float(torch_maps.max() - torch_maps.min()), 1e-12)
    map_error = float(np.abs(onnx_maps - torch_maps).max()) / map_range
    score_error = float(np.max(np.abs(onnx_scores - torch_scores) / np.maximum(np.abs(torch_scores), 1e-12)))
    if map_error > MAP_TOLERANCE[weight_dtype] or score_error > SCORE_TOLERANCE[weight_dtype]:
        raise FlawmapError(
            f"the exported {model.method} graph does not reproduce the torch model on calibration images "
            f"(map error {map_error:.2e} of the range, score error {score_error:.2e} relative); nothing written"
        )
