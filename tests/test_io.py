import json
import pickle

import numpy as np
import pytest
import torch

from flawmap import io
from flawmap.errors import FlawmapError
from flawmap.models import AnomalyModel, PatchCore


def test_round_trip_gives_identical_predictions(tiny_model, tiny_model_dir, tiny_dataset):
    loaded = AnomalyModel.load(tiny_model_dir)
    assert isinstance(loaded, PatchCore)
    assert loaded.get_params() == tiny_model.get_params()
    assert loaded.threshold_ == tiny_model.threshold_
    assert torch.equal(loaded.memory_bank_, tiny_model.memory_bank_)
    paths = sorted(tiny_dataset.glob("test/*/*.png"))[:3]
    for original, reloaded in zip(tiny_model.predict(paths), loaded.predict(paths)):
        assert original.score == reloaded.score
        np.testing.assert_array_equal(original.anomaly_map, reloaded.anomaly_map)


def test_directory_holds_only_json_and_safetensors(tiny_model_dir):
    names = sorted(path.name for path in tiny_model_dir.iterdir())
    assert names[0] == "config.json" and len(names) == 2
    assert names[1].startswith("model-") and names[1].endswith(".safetensors")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["method"] == "patchcore" and config["files"]["model"] == names[1]


def test_loading_never_unpickles(tiny_model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a model")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    AnomalyModel.load(tiny_model_dir)


def test_crash_mid_save_leaves_previous_model_intact(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    other = AnomalyModel.load(target)
    other.memory_bank_ = other.memory_bank_ + 1.0  # a different model to save over the first
    original_write = io.write_atomically

    def crash_on_config(path, payload):
        if path.name == io.CONFIG_FILE:
            raise KeyboardInterrupt("power cut")
        original_write(path, payload)

    monkeypatch.setattr(io, "write_atomically", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        other.save(target)
    reloaded = AnomalyModel.load(target)
    assert torch.equal(reloaded.memory_bank_, tiny_model.memory_bank_)
    assert (target / io.CONFIG_FILE).read_bytes() == before[io.CONFIG_FILE]
    monkeypatch.undo()
    other.save(target)  # a later save succeeds and removes the orphaned tensor file
    assert torch.equal(AnomalyModel.load(target).memory_bank_, other.memory_bank_)
    assert len(list(target.glob("*.safetensors"))) == 1


def test_refuses_to_overwrite_a_folder_that_is_not_a_model(tiny_model, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FlawmapError, match="not a flawmap model directory"):
        tiny_model.save(tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "config.json").unlink(), "not a flawmap model"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"format": "other"}'), "not a flawmap model config"),
        (lambda d: _edit_config(d, format_version=99), "format version 99"),
        (lambda d: _edit_config(d, method="nope"), "unknown method 'nope'"),
        (lambda d: [p.write_bytes(b"garbage") for p in d.glob("*.safetensors")], "cannot read tensors"),
        (lambda d: [p.unlink() for p in d.glob("*.safetensors")], "missing tensor file"),
    ],
)
def test_broken_model_directories_raise_clear_errors(tiny_model, tmp_path, corrupt, message):
    target = tiny_model.save(tmp_path / "model")
    corrupt(target)
    with pytest.raises(FlawmapError, match=message):
        AnomalyModel.load(target)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FlawmapError, match="not found"):
        AnomalyModel.load(tmp_path / "absent")


def test_local_backbone_weights_travel_with_the_model(tiny_dataset, tmp_path):
    from safetensors.torch import save_file

    from flawmap.backbones import create_backbone

    weights_path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("efficientnet_lite0").state_dict().items()}, str(weights_path))
    model = PatchCore(image_size=64, weights=str(weights_path)).fit(tiny_dataset)
    target = model.save(tmp_path / "model")
    weights_path.unlink()  # the model must not depend on the original file any more
    reloaded = AnomalyModel.load(target)
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert reloaded.predict(image)[0].score == pytest.approx(model.predict(image)[0].score, rel=1e-6)


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
