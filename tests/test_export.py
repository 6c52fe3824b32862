"""Export to ONNX: the graph reproduces the torch model (parity on real bottle images for every
method), its metadata, the variants (fixed batch, uint8 input, float16 storage) and bad input."""

import importlib.util
import json

import numpy as np
import onnx
import pytest

import flawmap
from flawmap import io
from flawmap.errors import FlawmapError
from flawmap.export import export_onnx
from flawmap.model_card import CARD_METADATA_KEY
from flawmap.models import METHODS, load_model
from flawmap.onnx_model import METADATA_KEYS

ALL_METHODS = METHODS.names()


def assert_parity(exported, reference, images, batch_size):
    """Maps within 1e-3 of each map's range, scores within 1e-4 relative, identical verdicts."""
    exported.set_runtime(batch_size=batch_size)
    for ours, theirs in zip(exported.predict(images), reference.predict(images), strict=True):
        map_range = float(theirs.anomaly_map.max() - theirs.anomaly_map.min())
        assert np.abs(ours.anomaly_map - theirs.anomaly_map).max() <= 1e-3 * map_range
        assert ours.score == pytest.approx(theirs.score, rel=1e-4)
        assert ours.is_anomalous == theirs.is_anomalous


@pytest.mark.parametrize("method", ALL_METHODS)
def test_parity_on_bottle(method, bottle_export, bottle_test_images):
    model_dir, onnx_path = bottle_export(method)
    reference = load_model(model_dir, precision="float32", batch_size=4, num_workers=1)
    exported = flawmap.load(onnx_path, num_workers=1)
    assert exported.threshold_ == reference.threshold_ and exported.image_size == reference.image_size == 256
    assert_parity(exported, reference, bottle_test_images, batch_size=4)


@pytest.mark.parametrize("method", [method for method in ALL_METHODS if METHODS.get(method).traits.export_batch == "dynamic"])
def test_dynamic_batch_results_do_not_depend_on_the_batch(method, bottle_export, bottle_test_images):
    exported = flawmap.load(bottle_export(method)[1], num_workers=1)
    assert exported.fixed_batch is None
    alone = exported.set_runtime(batch_size=1).predict(bottle_test_images)
    together = exported.set_runtime(batch_size=len(bottle_test_images)).predict(bottle_test_images)
    for single, batched in zip(alone, together, strict=True):
        assert batched.score == pytest.approx(single.score, rel=1e-5)
        np.testing.assert_allclose(batched.anomaly_map, single.anomaly_map, rtol=1e-5, atol=1e-5)


def test_metadata_names_the_source_model(bottle_export):
    model_dir, onnx_path = bottle_export("patchcore")
    exported, reference = flawmap.load(onnx_path), load_model(model_dir)
    assert set(exported.metadata) == {*METADATA_KEYS, CARD_METADATA_KEY}  # the card's record: optional when read, always written
    assert exported.metadata["source_sha256"] == io.model_directory_digest(model_dir)
    assert exported.metadata["flawmap_version"] == flawmap.__version__ and exported.method == "patchcore"
    assert (exported.map_low_, exported.map_high_) == (reference.map_low_, reference.map_high_)
    assert json.loads(exported.metadata["params"]) == reference.get_params()
    assert exported.metadata["batch"] == "dynamic" and exported.metadata["input_dtype"] == "float32"


def test_spade_needs_a_fixed_batch(tiny_dataset, tmp_path):
    model_dir = flawmap.create_model("spade", **METHODS.get("spade").quick_params).fit(tiny_dataset).save(tmp_path / "m")
    with pytest.raises(FlawmapError, match="spade cannot be exported with a dynamic batch.*--batch 1"):
        export_onnx(model_dir, tmp_path / "spade.onnx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m"]


def test_fixed_batch_uint8_input_pads_the_last_batch(tiny_model, tiny_model_dir, tiny_dataset, tmp_path):
    out = export_onnx(tiny_model_dir, tmp_path / "m.onnx", batch=3, input_dtype="uint8")
    exported = flawmap.load(out, batch_size=5)
    (graph_input,) = onnx.load(out).graph.input
    assert exported.fixed_batch == 3 and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    images = sorted(tiny_dataset.glob("test/*/*.png"))[:7]
    reference = load_model(tiny_model_dir, precision="float32")
    assert_parity(exported, reference, images, batch_size=5)


def test_float16_storage_halves_the_file(tiny_onnx, tiny_model_dir, tiny_dataset, tmp_path):
    half = export_onnx(tiny_model_dir, tmp_path / "half.onnx", weight_dtype="float16")
    assert half.stat().st_size < 0.6 * tiny_onnx.stat().st_size
    images = sorted(tiny_dataset.glob("test/*/*.png"))
    for ours, theirs in zip(flawmap.load(half).predict(images), flawmap.load(tiny_onnx).predict(images), strict=True):
        assert ours.score == pytest.approx(theirs.score, rel=1e-2)
        map_range = float(theirs.anomaly_map.max() - theirs.anomaly_map.min())
        assert np.abs(ours.anomaly_map - theirs.anomaly_map).max() <= 1e-2 * map_range


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda folder: (folder / "config.json").unlink(), "not a flawmap model"),
        (lambda folder: next(folder.glob("model-*.safetensors")).write_bytes(b"junk"), "cannot read tensors"),
        (lambda folder: next(folder.glob("model-*.safetensors")).unlink(), "missing tensor file"),
    ],
    ids=["unfitted", "corrupt", "incomplete"],
)
def test_bad_model_directory_writes_nothing(tiny_model, tmp_path, breakage, message):
    model_dir = tiny_model.save(tmp_path / "model")
    breakage(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(FlawmapError, match=message):
        export_onnx(model_dir, out_dir / "m.onnx")
    assert list(out_dir.iterdir()) == []


def test_bad_arguments_are_one_line_errors(tiny_model_dir, tmp_path):
    bad = [
        ({"batch": 0}, "batch must be"),
        ({"batch": "any"}, "batch must be"),
        ({"weight_dtype": "int8"}, "weight_dtype must be one of float32, float16"),
        ({"input_dtype": "float64"}, "input_dtype must be one of float32, uint8"),
        ({"opset": 11}, "opset must be at least 18"),
    ]
    for arguments, message in bad:
        with pytest.raises(FlawmapError, match=message):
            export_onnx(tiny_model_dir, tmp_path / "m.onnx", **arguments)
    with pytest.warns(FutureWarning, match="precision= is deprecated .* use weight_dtype="):  # its former name, checked the same
        with pytest.raises(FlawmapError, match="weight_dtype must be one of float32, float16, got 'int8'"):
            export_onnx(tiny_model_dir, tmp_path / "m.onnx", precision="int8")
    with pytest.raises(FlawmapError, match="is a directory"):
        export_onnx(tiny_model_dir, tmp_path)
    with pytest.raises(FlawmapError, match="does not exist"):
        export_onnx(tiny_model_dir, tmp_path / "absent" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_export_extra_is_named(tiny_model_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else find_spec(name))
    with pytest.raises(FlawmapError, match=r'exporting needs onnxscript: pip install "flawmap\[torch,export\]"'):
        export_onnx(tiny_model_dir, tmp_path / "m.onnx")
