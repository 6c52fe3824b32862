"""Exported models under onnxruntime: what is refused on loading and scoring, and the runtime."""

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import flawmap
from flawmap.cli import main
from flawmap.errors import FlawmapError
from flawmap.onnx_model import OnnxModel, load_onnx


def with_metadata(source, target, **changes):
    """Copy the ONNX file ``source`` to ``target`` with metadata entries changed (None: removed)."""
    model = onnx.load(source)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    metadata.update(changes)
    onnx.helper.set_model_props(model, {key: value for key, value in metadata.items() if value is not None})
    onnx.save(model, target)
    return target


def test_load_dispatches_on_file_or_directory(tiny_onnx, tiny_model_dir, tmp_path):
    assert isinstance(flawmap.load(tiny_onnx), OnnxModel)
    assert isinstance(flawmap.load(tiny_model_dir), flawmap.AnomalyModel)
    with pytest.raises(FlawmapError, match="no such model directory or .onnx file"):
        flawmap.load(tmp_path / "absent.onnx")


def test_backend_onnx_runs_the_export_of_the_directorys_present_content(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    with pytest.raises(FlawmapError, match=r"no model.onnx to run with onnxruntime; write it with: flawmap export"):
        flawmap.load(model_dir, backend="onnx")
    assert main(["export", str(model_dir)]) == 0  # default --out: MODEL_DIR/model.onnx
    assert isinstance(flawmap.load(model_dir, backend="onnx"), OnnxModel)
    assert isinstance(flawmap.load(model_dir, "torch"), flawmap.AnomalyModel)
    with pytest.warns(FutureWarning, match="runtime= is deprecated .* use backend="):  # the former name, for one release
        assert isinstance(flawmap.load(model_dir, runtime="onnx"), OnnxModel)
    config = model_dir / "config.json"
    config.write_text(config.read_text() + " ")  # the directory changed after the export (a refit, an update)
    with pytest.raises(FlawmapError, match="exported from an earlier state .* export it again"):
        flawmap.load(model_dir, backend="onnx")


def test_backend_names_are_checked(tiny_onnx):
    with pytest.raises(FlawmapError, match="runs with onnxruntime only"):
        flawmap.load(tiny_onnx, backend="torch")
    with pytest.raises(FlawmapError, match="backend must be one of auto, torch, onnx, got 'tensorrt'"):
        flawmap.load(tiny_onnx, backend="tensorrt")
    with pytest.raises(FlawmapError, match=r"give backend= only \(runtime= is its former name\)"):
        flawmap.load(tiny_onnx, backend="onnx", runtime="onnx")


def test_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(FlawmapError, match="not a readable ONNX model"):
        load_onnx(path)


def test_an_onnx_model_that_is_not_ours(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(FlawmapError, match="not a flawmap model \\(no flawmap metadata\\)"):
        load_onnx(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": "9"}, "format version 9 is not supported"),
        ({"threshold": None}, "missing key 'threshold'"),
        ({"image_size": "128"}, "do not match its metadata"),
        ({"batch": "4"}, "do not match its metadata"),
        ({"input_dtype": "uint8"}, "do not match its metadata"),
    ],
)
def test_metadata_that_does_not_fit_the_file(tiny_onnx, tmp_path, changes, message):
    with pytest.raises(FlawmapError, match=message):
        load_onnx(with_metadata(tiny_onnx, tmp_path / "edited.onnx", **changes))


def test_images_of_the_wrong_size(tiny_onnx):
    exported = load_onnx(tiny_onnx)
    with pytest.raises(FlawmapError, match="takes images of shape B x 3 x 64 x 64, got 2 x 3 x 32 x 32"):
        exported.score_images(np.zeros((2, 3, 32, 32), dtype=np.float32))
    scores, maps = exported.score_images(np.zeros((2, 3, 64, 64), dtype=np.float32))
    assert scores.shape == (2,) and maps.shape == (2, 64, 64)


def test_runtime_settings(tiny_onnx):
    with pytest.raises(FlawmapError, match=r"computes in float32 .*; precision 'float32' \(the arithmetic\) applies to model directories only"):
        load_onnx(tiny_onnx, precision="float32")
    with pytest.raises(FlawmapError, match="runs on cpu or cuda"):
        load_onnx(tiny_onnx, device="tpu")
    exported = load_onnx(tiny_onnx, batch_size=3, num_workers=1)
    assert (exported.runtime.batch_size, exported.runtime.num_workers) == (3, 1)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(FlawmapError, match="no CUDA provider"):
            exported.set_runtime(device="cuda")
        assert exported.runtime.device == "cpu"
