import json
import shutil

import numpy as np
import pytest
import torch

from flawmap import io
from flawmap.errors import FlawmapError
from flawmap.models import AnomalyModel, PatchCore
from flawmap.search import build_search


def bank_of(model):
    return model.scorer_.search.state()[1]["centered"]


def test_round_trip_gives_identical_predictions(tiny_model, tiny_model_dir, tiny_dataset):
    loaded = AnomalyModel.load(tiny_model_dir)
    assert isinstance(loaded, PatchCore)
    assert loaded.get_params() == tiny_model.get_params()
    assert loaded.threshold_ == tiny_model.threshold_
    assert torch.equal(bank_of(loaded), bank_of(tiny_model))
    assert torch.equal(loaded.calibration_images_, tiny_model.calibration_images_)
    paths = sorted(tiny_dataset.glob("test/*/*.png"))[:3]
    for original, reloaded in zip(tiny_model.predict(paths), loaded.predict(paths)):
        assert original.score == reloaded.score
        np.testing.assert_array_equal(original.anomaly_map, reloaded.anomaly_map)


def test_directory_holds_only_json_and_safetensors(tiny_model_dir):
    names = sorted(path.name for path in tiny_model_dir.iterdir())
    assert len(names) == 3 and names[1] == "config.json"
    assert names[0].startswith("calibration-") and names[2].startswith("model-")
    assert all(name.endswith(".safetensors") for name in (names[0], names[2]))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["method"] == "patchcore" and config["files"] == {"model": names[2], "calibration": names[0]}


def test_runtime_settings_are_not_saved(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert not {"device", "precision", "batch_size", "num_workers", "progress"} & set(config["params"])


def test_model_saved_on_another_device_loads_here_with_identical_scores(tiny_model, tiny_model_dir, tmp_path, tiny_dataset):
    """A config that says the model was fitted on a GPU (as one saved there does) loads on this CPU."""
    import shutil

    target = tmp_path / "from-gpu"
    shutil.copytree(tiny_model_dir, target)
    _edit_config(target, saved_with={"device": "cuda:0", "precision": "bfloat16", "torch": "2.13.0+cu128"})
    loaded = AnomalyModel.load(target)
    assert loaded.runtime.device == "cpu"
    paths = sorted(tiny_dataset.glob("test/*/*.png"))[:3]
    for original, reloaded in zip(tiny_model.predict(paths), loaded.predict(paths)):
        assert original.score == reloaded.score
        np.testing.assert_array_equal(original.anomaly_map, reloaded.anomaly_map)


def test_asking_for_an_absent_gpu_is_a_clear_error(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FlawmapError, match="no usable CUDA device"):
        AnomalyModel.load(tiny_model_dir, device="cuda")


def test_precision_set_after_loading_reaches_the_search(tiny_model_dir):
    loaded = AnomalyModel.load(tiny_model_dir, precision="bfloat16")
    assert loaded.scorer_.search.coarse_bank is not None and loaded.scorer_.low_precision == torch.bfloat16
    loaded.set_runtime(precision="float32")
    assert loaded.scorer_.search.coarse_bank is None and loaded.scorer_.low_precision is None


def test_crash_mid_save_leaves_previous_model_intact(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    other = AnomalyModel.load(target)
    other.scorer_.search = build_search(bank_of(other) + 1.0)  # a different model to save over the first
    original_write = io.write_atomically

    def crash_on_config(path, payload):
        if path.name == io.CONFIG_FILE:
            raise KeyboardInterrupt("power cut")
        original_write(path, payload)

    monkeypatch.setattr(io, "write_atomically", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        other.save(target)
    reloaded = AnomalyModel.load(target)
    assert torch.equal(bank_of(reloaded), bank_of(tiny_model))
    assert (target / io.CONFIG_FILE).read_bytes() == before[io.CONFIG_FILE]
    monkeypatch.undo()
    other.save(target)  # a later save succeeds and removes the orphaned tensor file
    assert torch.equal(bank_of(AnomalyModel.load(target)), bank_of(other))
    assert len(list(target.glob("model-*.safetensors"))) == 1


def test_refuses_to_overwrite_a_folder_that_is_not_a_model(tiny_model, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FlawmapError, match="not a flawmap model directory"):
        tiny_model.save(tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "config.json").unlink(), "not a flawmap model"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"format": "other", "files": {}}'), "not a flawmap model config"),
        (lambda d: (d / "config.json").write_text('{"format": "other"}'), "malformed key 'files'"),
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


def _edit_section(directory, section, **changes):
    """Set (or, with the value ``...``, delete) keys of ``config.json``'s ``section``."""
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[section][key]
        else:
            config[section][key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(section="params", image_size="big"), r"config\.json: params\.image_size must be int, got \"big\""),
        (dict(section="params", sigma=...), r"config\.json: missing key params\.sigma"),
        (dict(section="params", colour="red"), r"config\.json: unknown key params\.colour"),
        (dict(section="params", taps=[1, 2]), r"config\.json: params\.taps must be a list of str or null"),
        (dict(section="params", false_alarm_rate=2.0), r"config\.json: false_alarm_rate must be in \(0, 1\)"),
        (dict(section="fitted", threshold_=...), r"config\.json: missing key fitted\.threshold_"),
        (dict(section="fitted", threshold_="high"), r"config\.json: fitted\.threshold_ must be float"),
        (dict(section="fitted", calibration_={"threshold": 1}), r"config\.json: 'calibration_': malformed"),
        (dict(section="fitted", taps_=["no_such_stage"]), r"config\.json: 'taps_' do not fit backbone"),
    ],
)
def test_tampered_config_is_one_clear_error_naming_config_json(tiny_model, tmp_path, edit, message):
    target = tiny_model.save(tmp_path / "model")
    _edit_section(target, **edit)
    with pytest.raises(FlawmapError, match=message) as raised:
        AnomalyModel.load(target)
    assert "\n" not in str(raised.value) and "fit() first" not in str(raised.value)


def test_tensor_file_of_another_method_names_the_tensor_file(tiny_model, tiny_dataset, tmp_path):
    from flawmap.models import Padim

    target = tiny_model.save(tmp_path / "patchcore")
    other = Padim(image_size=64, n_features=8).set_runtime(batch_size=8).fit(tiny_dataset).save(tmp_path / "padim")
    config, other_config = (json.loads((d / "config.json").read_text()) for d in (target, other))
    foreign = other / other_config["files"]["model"]
    shutil.copy(foreign, target / foreign.name)
    config["files"]["model"] = foreign.name
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlawmapError, match=rf"{foreign.name}: .*patchcore"):
        AnomalyModel.load(target)


def test_calibration_images_of_the_wrong_shape_name_their_file(tiny_model, tmp_path):
    from safetensors.torch import save_file

    target = tiny_model.save(tmp_path / "model")
    (calibration_file,) = target.glob("calibration-*.safetensors")
    save_file({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, str(calibration_file))
    with pytest.raises(FlawmapError, match=rf"{calibration_file.name}: expected uint8 calibration images"):
        AnomalyModel.load(target)


def test_version_3_directories_load_with_the_defaults_of_later_parameters(tiny_model, tmp_path):
    """A model saved before tiling and faiss existed (format 3, without their parameters) loads as it was."""
    target = tiny_model.save(tmp_path / "model")
    _edit_section(target, "params", tile_size=..., tile_overlap=..., search=..., search_options=...)
    _edit_config(target, format_version=3)
    reloaded = AnomalyModel.load(target)
    assert reloaded.tile_size is None and reloaded.tile_overlap == 32
    assert (reloaded.search, reloaded.search_options) == ("torch", None)
    image = np.full((64, 64, 3), 127, dtype=np.uint8)
    assert reloaded.predict(image)[0].score == pytest.approx(tiny_model.predict(image)[0].score, rel=1e-6)


@pytest.mark.parametrize("format_version", [5, io.FORMAT_VERSION])
def test_models_saved_with_the_former_search_parameters_load(tiny_model, tmp_path, format_version):
    """Before ``search_options`` (same format version), memory-bank models saved ``search="exact"``
    and faiss-ivfpq's ``nlist``, ``nprobe``, ``pq_m`` as hyper-parameters of their own."""
    target = tiny_model.save(tmp_path / "model")
    _edit_section(target, "params", search="exact", search_options=..., nlist=None, nprobe=None, pq_m=None)
    _edit_config(target, format_version=format_version)
    reloaded = AnomalyModel.load(target)
    assert (reloaded.search, reloaded.search_options) == ("torch", None)
    assert set(reloaded.get_params()) == set(tiny_model.get_params())
    _edit_section(target, "params", nlist=8)  # an option of another backend: the one-line error of today's check
    with pytest.raises(FlawmapError, match=r"config.json: search 'torch' has no option 'nlist'; it takes none$"):
        AnomalyModel.load(target)


@pytest.mark.parametrize("taps", [["stage2", "stage5"], ["stage3", "stage4"]])
def test_edited_taps_that_exist_but_do_not_fit_the_tensors_fail_at_load(tiny_model, tmp_path, taps):
    """Taps of the same backbone embed features of another size than the saved bank: a one-line
    error at load, not a RuntimeError from the search at the first prediction."""
    target = tiny_model.save(tmp_path / "model")
    _edit_section(target, "fitted", taps_=taps)
    _edit_section(target, "params", taps=taps)
    with pytest.raises(FlawmapError, match=r"config.json: its backbone and taps do not fit the saved tensors"):
        AnomalyModel.load(target)
