"""Thresholds that cannot be silently broken (issue 32): duplicate training images count once,
``calibrate`` refuses training images and too few images, and keeps what it replaced."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import one_error_line, run_cli
from flawmap.calibration import MIN_CALIBRATION_IMAGES, CalibrationWarning
from flawmap.data import Sample
from flawmap.data.digests import DuplicateImageWarning, content_digest, distinct_images
from flawmap.data.loader import as_samples
from flawmap.models import PatchCore, load_model

TINY = {"image_size": 64, "coreset_fraction": 0.25}


def tiny_patchcore() -> PatchCore:
    return PatchCore(**TINY).set_runtime(batch_size=8, progress=False)


# ---------------------------------------------------------------- content digests
def test_digests_name_content_not_paths(tmp_path):
    first, copy, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    first.write_bytes(b"same bytes")
    copy.write_bytes(b"same bytes")
    other.write_bytes(b"other bytes")
    samples = [Sample(first), Sample(copy), Sample(other)]
    assert content_digest(samples[0]) == content_digest(samples[1]) != content_digest(samples[2])
    pixels = np.zeros((4, 4, 3), np.uint8)
    square, flat, twin = as_samples([pixels, pixels.reshape(4, 12, 1), pixels.copy()])
    assert content_digest(square) != content_digest(flat)  # the shape is part of the content
    kept, digests, dropped = distinct_images([*samples, square, twin], known={content_digest(samples[2])})
    assert kept == [samples[0], square] and len(digests) == 2
    assert dropped == [f"{copy} (same as {first})", f"{other} (already learned)", "array 2 (same as array 0)"]


# ---------------------------------------------------------------- fit: duplicates count once
def test_duplicated_training_images_leave_the_threshold_in_its_interval(tiny_dataset, tiny_model, tmp_path):
    copy = shutil.copytree(tiny_dataset / "train" / "good", tmp_path / "copies")
    for path in sorted(copy.glob("*.png")):
        path.rename(path.with_name("copy_" + path.name))  # other names, same content
    with pytest.warns(DuplicateImageWarning, match=r"12 training images given again counted once: .*copy_000.png \(same as "):
        doubled = tiny_patchcore().fit([tiny_dataset, copy])
    low, high = tiny_model.calibration_.threshold_interval
    assert low <= doubled.threshold_ <= high
    assert doubled.threshold_ == pytest.approx(tiny_model.threshold_)
    assert doubled.n_train_images_ == tiny_model.n_train_images_ == len(doubled.train_digests_) == 12


def test_partial_fit_skips_images_already_learned(tiny_dataset, tmp_path):
    model = tiny_patchcore().fit(sorted((tiny_dataset / "train" / "good").glob("*.png"))[:6])
    with pytest.warns(DuplicateImageWarning, match="6 training images given again counted once: .*already learned"):
        model.partial_fit(tiny_dataset)
    assert model.n_train_images_ == len(model.train_digests_) == len(set(model.train_digests_)) == 12


# ---------------------------------------------------------------- calibrate: refusals
def test_calibrate_refuses_training_images_unless_allowed(capsys, tiny_dataset, tiny_model_dir, new_good_images, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = (model_dir / "config.json").read_bytes()
    # one training image hidden among new ones, under another name
    mixed = shutil.copytree(new_good_images, tmp_path / "mixed")
    shutil.copy(tiny_dataset / "train" / "good" / "003.png", mixed / "renamed.png")
    code, _, err = run_cli(capsys, "calibrate", model_dir, mixed)
    assert "1 of the 17 calibration images is a training image" in one_error_line(code, err) and "renamed.png" in err
    assert (model_dir / "config.json").read_bytes() == before
    code, out, err = run_cli(capsys, "calibrate", model_dir, tiny_dataset / "train" / "good", "--allow-training-images")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "info", model_dir)
    assert "training images allowed (--allow-training-images)" in out and "12 content digests recorded" in out


@pytest.mark.parametrize("n_images", [1, MIN_CALIBRATION_IMAGES - 1])
def test_calibrate_on_too_few_images_is_refused_and_keeps_the_threshold(
    capsys, tiny_dataset, tiny_model, tiny_model_dir, new_good_images, tmp_path, n_images
):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    images = sorted(new_good_images.glob("*.png"))[:n_images]
    code, _, err = run_cli(capsys, "calibrate", model_dir, *images)
    assert f"at least {MIN_CALIBRATION_IMAGES} distinct good images, got {n_images}" in one_error_line(code, err)
    # a given image twice is still one image
    code, _, err = run_cli(capsys, "calibrate", model_dir, *images, *images)
    assert f"got {n_images}" in one_error_line(code, err)
    model = load_model(model_dir)
    assert model.threshold_ == tiny_model.threshold_
    good = sorted((tiny_dataset / "test" / "good").glob("*.png"))
    passed = [not prediction.is_anomalous for prediction in model.predict(good)]
    assert any(passed) and passed == [not prediction.is_anomalous for prediction in tiny_model.predict(good)]


# ---------------------------------------------------------------- calibrate: history, --out, --restore
def test_calibrate_keeps_the_previous_calibration_and_restores_it(capsys, tiny_model_dir, new_good_images, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    original = load_model(model_dir)
    code, out, err = run_cli(capsys, "calibrate", model_dir, new_good_images, "--false-alarm-rate", "0.2")
    assert code == 0 and "1 earlier calibration(s) kept" in out, err
    recalibrated = load_model(model_dir)
    assert recalibrated.threshold_ != original.threshold_
    code, out, _ = run_cli(capsys, "info", model_dir)
    assert "the threshold rests on 16 distinct normal images" in out
    assert f"threshold {original.threshold_:.6g} at false-alarm rate 0.01: cross-fit" in out
    code, out, _ = run_cli(capsys, "calibrate", model_dir, "--restore")
    assert code == 0 and out.startswith("restored")
    restored = load_model(model_dir)
    for name in ("threshold_", "map_low_", "map_high_", "false_alarm_rate", "calibration_", "calibration_scores_"):
        assert getattr(restored, name) == getattr(original, name), name
    assert restored.calibration_history_ == []
    code, _, err = run_cli(capsys, "calibrate", model_dir, "--restore")
    assert "no earlier calibration to restore" in one_error_line(code, err)


def test_calibrate_out_leaves_the_model_as_it_was(capsys, tiny_model_dir, new_good_images, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = sorted((path.name, path.read_bytes()) for path in model_dir.iterdir())
    code, _, err = run_cli(capsys, "calibrate", model_dir, new_good_images, "--out", tmp_path / "recalibrated")
    assert code == 0, err
    assert sorted((path.name, path.read_bytes()) for path in model_dir.iterdir()) == before
    assert load_model(tmp_path / "recalibrated").calibration_.n_scores == 16
    code, _, err = run_cli(capsys, "calibrate", model_dir, new_good_images, "--out", tmp_path / "recalibrated")
    assert "already holds a model; give --force" in one_error_line(code, err)


@pytest.mark.parametrize("argv, message", [
    ([], "give GOOD_DIR"),
    (["GOOD", "--restore"], "not both"),
    (["--restore", "--allow-training-images"], "--restore takes no"),
])
def test_calibrate_argument_combinations(capsys, tiny_model_dir, new_good_images, argv, message):
    argv = [new_good_images if arg == "GOOD" else arg for arg in argv]
    code, _, err = run_cli(capsys, "calibrate", tiny_model_dir, *argv)
    assert message in one_error_line(code, err)


def test_a_model_of_format_6_loads_without_digests_and_says_so(capsys, tiny_model_dir, new_good_images, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["format_version"] = 6
    del config["fitted"]["train_digests_"], config["fitted"]["calibration_history_"]
    (model_dir / "config.json").write_text(json.dumps(config))
    model = load_model(model_dir)
    assert model.train_digests_ is None and model.calibration_history_ == []
    code, out, _ = run_cli(capsys, "info", model_dir)
    assert "no content digests recorded (saved by an older flawmap)" in out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.calibrate(new_good_images)
    assert any(issubclass(w.category, CalibrationWarning) and "cannot check" in str(w.message) for w in caught)


def test_a_malformed_history_is_a_one_line_error(capsys, tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["fitted"]["calibration_history_"] = [{"threshold_": 1.0}]
    (model_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "info", model_dir)
    assert "'calibration_history_': expected the keys" in one_error_line(code, err)
