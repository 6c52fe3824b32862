import itertools
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import run_cli
from flawmap.cli import main
from flawmap.data import open_dataset, read_mask
from flawmap.evaluate import RESULT_KEYS
from flawmap.metrics import aupro
from flawmap.models import load_model

SMALL = ["--image-size", "64", "--batch-size", "8"]


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("flawmap: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in lines[0]


def test_fit_evaluate_predict_end_to_end(capsys, tiny_dataset, tmp_path):
    model_dir = tmp_path / "model"
    code, out, _ = run_cli(capsys, "fit", tiny_dataset, "--method", "patchcore", "--out", model_dir, *SMALL, "--coreset-fraction", "0.2")
    assert code == 0 and "saved patchcore model" in out
    config = json.loads((model_dir / "config.json").read_text())
    assert config["params"]["coreset_fraction"] == 0.2 and config["params"]["image_size"] == 64

    metrics_path, maps_dir = tmp_path / "metrics.json", tmp_path / "maps"
    code, out, _ = run_cli(capsys, "evaluate", model_dir, tiny_dataset, "--json", metrics_path, "--maps-dir", maps_dir)
    assert code == 0 and "image_auroc" in out
    metrics = json.loads(metrics_path.read_text())
    assert list(metrics) == list(RESULT_KEYS)
    assert metrics["n_images"] == len(open_dataset(tiny_dataset).test)
    assert_metrics_reproduce_from_maps(metrics, maps_dir, tiny_dataset)

    out_dir = tmp_path / "predictions"
    images = sorted((tiny_dataset / "test").glob("*/*.png"))[:3]
    code, out, _ = run_cli(capsys, "predict", model_dir, *images, "--out", out_dir)
    assert code == 0
    records = [json.loads(line) for line in (out_dir / "scores.jsonl").read_text().splitlines()]
    assert [record["path"] for record in records] == [str(path) for path in images]
    keys = {"path", "score", "is_anomalous", "threshold", "overlay", "pixel_threshold", "regions"}
    assert all(set(record) == keys for record in records)
    predictions = {str(p.sample.image_path): p for p in load_model(model_dir).predict(images)}
    for record in records:
        assert record["regions"] == [region.to_json() for region in predictions[record["path"]].regions]
    # names keep the inputs' paths below their common folder (test/), not a flat index
    assert [record["overlay"] for record in records] == [f"{path.parent.name}/{path.stem}.png" for path in images]
    overlays = sorted(out_dir.glob("*/*.png"))
    assert len(overlays) == 3 and all((out_dir / record["overlay"]).is_file() for record in records)
    with Image.open(overlays[0]) as overlay:
        width, height = overlay.size  # original | heat map at the image's own size, caption and colour bar below
        assert width == 2 * 96 and height > 96


def test_export_then_predict_and_evaluate_the_onnx_file(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    code, out, err = run_cli(capsys, "export", tiny_model_dir, "--out", onnx_path, "--batch", "2", "--input-dtype", "uint8")
    assert code == 0 and f"to {onnx_path}" in out and "batch 2" in out
    from flawmap.export import EXPORT_STEPS

    assert all(f"exporting: {step}" in err for step in EXPORT_STEPS)  # progress of each step, onnxruntime's check included
    images = sorted((tiny_dataset / "test").glob("*/*.png"))[:3]
    outputs = {}
    for model in (tiny_model_dir, onnx_path):
        out_dir = tmp_path / f"predictions-{model.name}"
        precision = ["--precision", "float32"] if model == tiny_model_dir else []
        code, _, _ = run_cli(capsys, "predict", model, *images, "--out", out_dir, *precision)
        assert code == 0
        outputs[model] = [json.loads(line) for line in (out_dir / "scores.jsonl").read_text().splitlines()]
    for exported, reference in zip(outputs[onnx_path], outputs[tiny_model_dir], strict=True):
        assert exported["score"] == pytest.approx(reference["score"], rel=1e-4)
        assert exported["is_anomalous"] == reference["is_anomalous"]
    code, out, _ = run_cli(capsys, "evaluate", onnx_path, tiny_dataset)
    assert code == 0 and "image_auroc" in out
    code, _, err = run_cli(capsys, "predict", onnx_path, *images, "--out", tmp_path / "o", "--precision", "bfloat16")
    assert_one_line_error(code, err, "computes in float32", "precision 'bfloat16' (the arithmetic) applies to model directories only")
    code, _, err = run_cli(capsys, "export", tiny_model_dir, "--out", tmp_path / "m.onnx", "--batch", "0")
    assert_one_line_error(code, err, "batch must be")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists()


def assert_metrics_reproduce_from_maps(metrics, maps_dir, dataset_root):
    """Recompute the metrics from the written maps and scores, with scikit-learn where it can."""
    scores = json.loads((maps_dir / "scores.json").read_text())
    dataset = open_dataset(dataset_root)
    labels = [sample.is_anomalous for sample in dataset.test]
    image_scores = [scores[sample.key] for sample in dataset.test]
    assert roc_auc_score(labels, image_scores) == pytest.approx(metrics["image_auroc"], abs=1e-9)
    maps, masks = [], []
    for sample in dataset.test:
        anomaly_map = np.load(maps_dir / f"{sample.key}.npy")
        with Image.open(sample.image_path) as image:
            assert anomaly_map.shape == (image.height, image.width)
        mask = read_mask(sample.mask_path, anomaly_map.shape) if sample.mask_path else np.zeros(anomaly_map.shape, bool)
        maps.append(anomaly_map)
        masks.append(mask)
    pixels, truth = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    assert roc_auc_score(truth, pixels) == pytest.approx(metrics["pixel_auroc"], abs=1e-9)
    assert average_precision_score(truth, pixels) == pytest.approx(metrics["pixel_ap"], abs=1e-9)
    assert aupro(maps, masks) == pytest.approx(metrics["aupro"], abs=1e-9)


def test_fit_several_folders_into_one_model(capsys, tiny_dataset, new_good_images, tmp_path):
    extra = tmp_path / "more_good"
    extra.mkdir()
    for path in sorted(new_good_images.glob("*.png"))[:3]:  # other images (a copy of a training image counts once)
        shutil.copy(path, extra / f"extra_{path.name}")
    code, out, _ = run_cli(capsys, "fit", tiny_dataset, extra, "--out", tmp_path / "m", *SMALL)
    assert code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    fitted = config["fitted"]
    assert fitted["n_train_images_"] == len(fitted["calibration_scores_"]) == 12 + 3  # PatchCore cross-fits: nothing held out


def test_fit_update_adds_images_to_a_saved_model(capsys, tiny_dataset, tmp_path):
    train = sorted((tiny_dataset / "train" / "good").glob("*.png"))
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, paths in ((first, train[:6]), (second, train[6:])):
        folder.mkdir()
        for path in paths:
            (folder / path.name).symlink_to(path)
    model_dir = tmp_path / "model"
    code, out, _ = run_cli(capsys, "fit", first, "--out", model_dir, *SMALL, "--coreset-fraction", "0.25")
    assert code == 0
    code, out, _ = run_cli(capsys, "fit", second, "--update", model_dir, "--device", "cpu", "--precision", "float32")
    assert code == 0 and "in 2 fits" in out
    config = json.loads((model_dir / "config.json").read_text())
    assert config["fitted"]["n_fits_"] == 2
    assert config["fitted"]["n_train_images_"] == len(config["fitted"]["calibration_scores_"]) == 12
    one_fit = tmp_path / "one-fit"
    code, _, _ = run_cli(capsys, "fit", tiny_dataset, "--out", one_fit, *SMALL, "--coreset-fraction", "0.25")
    assert code == 0
    held_out_twice = load_model(model_dir).calibration_images_
    held_out_once = load_model(one_fit).calibration_images_
    assert torch.equal(held_out_twice[held_out_twice.flatten(1).sum(1).argsort()], held_out_once[held_out_once.flatten(1).sum(1).argsort()])


def test_fit_update_refuses_new_hyper_parameters(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--update", tiny_model_dir, "--coreset-fraction", "0.5", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "--coreset-fraction", "--update")
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--update", tiny_model_dir, "--method", "padim", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "patchcore model", "padim")
    code, _, err = run_cli(capsys, "fit", tiny_dataset)
    assert_one_line_error(code, err, "--out", "--update")


def test_runtime_flags_are_checked_and_never_saved(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, tiny_dataset, "--batch-size", "0")
    assert_one_line_error(code, err, "batch_size")
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, tiny_dataset, "--device", "gpu9")
    assert_one_line_error(code, err, "gpu9")
    code, _, _ = run_cli(capsys, "fit", tiny_dataset, "--out", tmp_path / "m", *SMALL, "--precision", "float32", "--num-workers", "1")
    assert code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "precision" not in config["params"] and "batch_size" not in config["params"]


def test_missing_data_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fit", tmp_path / "absent", "--out", tmp_path / "m")
    assert_one_line_error(code, err, tmp_path / "absent")


def test_folder_without_images(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, _, err = run_cli(capsys, "fit", tmp_path / "empty", "--out", tmp_path / "m")
    assert_one_line_error(code, err, tmp_path / "empty")


def test_corrupt_training_image_stops_fit_or_is_skipped(capsys, tiny_dataset, tmp_path):
    dataset = shutil.copytree(tiny_dataset, tmp_path / "data")
    broken = sorted((dataset / "train" / "good").glob("*.png"))[4]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated PNG
    code, _, err = run_cli(capsys, "fit", dataset, "--out", tmp_path / "m", *SMALL)
    assert_one_line_error(code, err, broken)
    assert not (tmp_path / "m").exists()
    with pytest.warns(UserWarning, match=str(broken)):
        code, out, _ = run_cli(capsys, "fit", dataset, "--out", tmp_path / "m", *SMALL, "--skip-invalid")
    assert code == 0


def test_wrong_size_mask(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    dataset = shutil.copytree(tiny_dataset, tmp_path / "data")
    mask_path = sorted((dataset / "ground_truth").glob("*/*.png"))[0]
    Image.new("L", (10, 10)).save(mask_path)
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, dataset)
    assert_one_line_error(code, err, mask_path)


def test_missing_mask(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    dataset = shutil.copytree(tiny_dataset, tmp_path / "data")
    mask_path = sorted((dataset / "ground_truth").glob("*/*.png"))[0]
    mask_path.unlink()
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, dataset)
    assert_one_line_error(code, err, "mask")


def test_model_dir_that_is_not_a_model(capsys, tiny_dataset, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", tiny_dataset, tiny_dataset)
    assert_one_line_error(code, err, tiny_dataset, "not a flawmap model")


def test_unknown_method_and_backbone(capsys, tiny_dataset, tmp_path):
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--method", "magic", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "unknown method 'magic'", "patchcore")
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--backbone", "vgg99", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "unknown backbone 'vgg99'", "efficientnet_lite0")


def test_missing_weights_file(capsys, tiny_dataset, tmp_path):
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--weights", tmp_path / "w.pth", "--out", tmp_path / "m")
    assert_one_line_error(code, err, tmp_path / "w.pth")


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flawmap.cli", "predict", str(tmp_path / "nomodel"), str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("flawmap: error:") and str(tmp_path / "nomodel") in result.stderr


def test_demo_data_command(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo-data", tmp_path / "demo")
    assert code == 0
    categories = sorted(path.name for path in (tmp_path / "demo").iterdir())
    assert len(categories) >= 3
    for category in categories:
        dataset = open_dataset(tmp_path / "demo" / category)
        assert len({sample.defect_type for sample in dataset.test}) >= 4  # good + 3 defect types


# ---------------------------------------------------------------- calibration commands (issue 17)
def copy_model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_info_describes_the_model_and_its_calibration(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "info", tiny_model_dir)
    assert code == 0
    assert "method: patchcore" in out and "coreset_fraction=0.25" in out
    assert "cross-fit" in out and "12 normal scores" in out
    # 12 scores support a rate of 1 / 39 at best (flawmap.calibration.smallest_supported_rate): the 1 % asked is raised
    assert f"false-alarm rate: target {1 / 39:g}, expected" in out and "(asked for 0.01: 12 normal images support no lower rate)" in out
    assert f"smallest rate 12 normal scores support: {1 / 39:.3g}" in out
    assert "pixel threshold: " in out and "good images with any region expected" in out
    code, out, _ = run_cli(capsys, "info", tiny_model_dir, "--json", "-")
    description = json.loads(out)  # stdout holds the JSON only
    assert description["threshold"] == load_model(tiny_model_dir).threshold_
    low, high = description["threshold_interval_90"]
    assert low <= description["threshold"] <= high
    assert description["pixel_threshold"] == load_model(tiny_model_dir).map_high_
    low, high = description["pixel_threshold_interval_90"]
    assert low <= description["pixel_threshold"] <= high


def test_calibrate_replaces_the_threshold_without_refitting(capsys, new_good_images, tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir, tmp_path)
    model_file = json.loads((model_dir / "config.json").read_text())["files"]["model"]
    code, out, _ = run_cli(capsys, "calibrate", model_dir, new_good_images, "--false-alarm-rate", "0.2")
    assert code == 0 and "false-alarm rate of 0.2" in out
    config = json.loads((model_dir / "config.json").read_text())
    assert config["files"]["model"] == model_file  # the bank is untouched
    assert config["params"]["false_alarm_rate"] == 0.2 and len(config["fitted"]["calibration_scores_"]) == 16
    assert config["fitted"]["calibration_"]["source"].startswith("calibrate: 16 new normal images")
    scores = np.sort(config["fitted"]["calibration_scores_"])
    assert scores[0] <= config["fitted"]["threshold_"] <= scores[-1] * 2


@pytest.mark.parametrize("rate", ["0", "1", "1.5", "-0.1", "nan"])
def test_false_alarm_rate_outside_zero_one_is_rejected(capsys, tiny_dataset, tiny_model_dir, tmp_path, rate):
    code, _, err = run_cli(capsys, "calibrate", tiny_model_dir, tiny_dataset / "test" / "good", "--false-alarm-rate", rate)
    assert_one_line_error(code, err, "false_alarm_rate must be in (0, 1)")
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--out", tmp_path / "m", *SMALL, "--false-alarm-rate", rate)
    assert_one_line_error(code, err, "false_alarm_rate must be in (0, 1)")


@pytest.mark.parametrize("sigma", ["-1", "nan"])
def test_bad_sigma_is_rejected_before_fitting(capsys, tiny_dataset, tmp_path, sigma):
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--out", tmp_path / "m", *SMALL, "--sigma", sigma)
    assert_one_line_error(code, err, "sigma must be >= 0")
    assert not (tmp_path / "m").exists()


def test_predict_threshold_overrides_the_calibrated_one(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    images = sorted((tiny_dataset / "test").glob("*/*.png"))[:3]
    code, _, _ = run_cli(capsys, "predict", tiny_model_dir, *images, "--out", tmp_path / "p", "--threshold", "1e9")
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "p" / "scores.jsonl").read_text().splitlines()]
    assert all(record["threshold"] == 1e9 and not record["is_anomalous"] for record in records)


def test_evaluate_reports_the_achieved_rates_and_json_to_stdout(capsys, tiny_dataset, tiny_model_dir):
    code, out, err = run_cli(capsys, "evaluate", tiny_model_dir, tiny_dataset, "--json", "-")
    assert code == 0 and "false_alarm_rate" in err  # the table goes to stderr, stdout is JSON only
    metrics = json.loads(out)
    model = load_model(tiny_model_dir)
    scores = {prediction.sample.key: prediction for prediction in model.predict(open_dataset(tiny_dataset))}
    normal = [p.score > model.threshold_ for p in scores.values() if not p.sample.is_anomalous]
    anomalous = [p.score > model.threshold_ for p in scores.values() if p.sample.is_anomalous]
    assert metrics["threshold"] == model.threshold_
    assert metrics["false_alarm_rate"] == pytest.approx(np.mean(normal))
    assert metrics["recall"] == pytest.approx(np.mean(anomalous))


# ---------------------------------------------------------------- nothing lost (issue 17)
def test_failed_predict_leaves_the_earlier_output_byte_identical(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    images = sorted((tiny_dataset / "test").glob("*/*.png"))[:3]
    out_dir = tmp_path / "out"
    assert run_cli(capsys, "predict", tiny_model_dir, *images, "--out", out_dir)[0] == 0
    before = {path.relative_to(out_dir): path.read_bytes() for path in out_dir.rglob("*") if path.is_file()}
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:100])
    code, _, err = run_cli(capsys, "predict", tiny_model_dir, images[1], broken, "--out", out_dir)
    assert_one_line_error(code, err, broken)
    after = {path.relative_to(out_dir): path.read_bytes() for path in out_dir.rglob("*") if path.is_file()}
    assert after == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.png", "out"]  # no staging left behind
    # a successful re-run replaces the whole output: no stale overlays of the earlier run
    assert run_cli(capsys, "predict", tiny_model_dir, images[2], "--out", out_dir)[0] == 0
    assert [path.name for path in out_dir.rglob("*.png")] == [images[2].name]


def test_predict_refuses_to_replace_a_folder_it_did_not_write(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    code, _, err = run_cli(capsys, "predict", tiny_model_dir, tiny_dataset / "test" / "good", "--out", tmp_path / "photos")
    assert_one_line_error(code, err, "photos", "not an earlier predict output")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"


def test_predict_recursive_keeps_relative_paths(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "predict", tiny_model_dir, tiny_dataset / "test", "--out", tmp_path / "p")
    assert_one_line_error(code, err, "subfolders not searched")
    code, _, _ = run_cli(capsys, "predict", tiny_model_dir, tiny_dataset / "test", "--out", tmp_path / "p", "--recursive", "--quiet")
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "p" / "scores.jsonl").read_text().splitlines()]
    expected = sorted(path.relative_to(tiny_dataset / "test").as_posix() for path in (tiny_dataset / "test").glob("*/*.png"))
    assert sorted(record["overlay"] for record in records) == expected


def test_fit_onto_an_existing_model_needs_force(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir, tmp_path)
    config_before = (model_dir / "config.json").read_bytes()
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--out", model_dir, *SMALL, "--coreset-fraction", "0.5")
    assert_one_line_error(code, err, model_dir, "--force")
    assert (model_dir / "config.json").read_bytes() == config_before
    code, _, _ = run_cli(capsys, "fit", tiny_dataset, "--out", model_dir, *SMALL, "--coreset-fraction", "0.5", "--force")
    assert code == 0 and json.loads((model_dir / "config.json").read_text())["params"]["coreset_fraction"] == 0.5


def test_unwritable_outputs_fail_before_the_long_work(capsys, tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    started = []
    monkeypatch.setattr("flawmap.models.base.AnomalyModel.partial_fit", lambda *a, **k: started.append(1))
    monkeypatch.setattr("flawmap.evaluate.evaluate", lambda *a, **k: started.append(1))
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--out", blocker / "model", *SMALL)
    assert_one_line_error(code, err, blocker / "model", "is a file, not a folder")
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, tiny_dataset, "--json", blocker / "m.json")
    assert_one_line_error(code, err, blocker / "m.json")
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, tiny_dataset, "--maps-dir", blocker)
    assert_one_line_error(code, err, blocker, "is a file, not a folder")
    code, _, err = run_cli(capsys, "predict", tiny_model_dir, tiny_dataset / "test" / "good", "--out", blocker / "p")
    assert_one_line_error(code, err, blocker / "p")
    assert not started


def test_warnings_start_on_a_new_line_while_a_progress_bar_is_drawn():
    import io

    from tqdm import tqdm

    from flawmap.cli import _one_line_warning

    assert _one_line_warning("careful", UserWarning, "x.py", 1) == "flawmap: warning: careful\n"
    with tqdm(total=3, file=io.StringIO()):
        assert _one_line_warning("careful", UserWarning, "x.py", 1) == "\nflawmap: warning: careful\n"


@pytest.mark.parametrize(
    "argv, old, new, value",
    [
        (["predict", "M", "x.png", "--out", "o", "--runtime", "onnx"], "--runtime", "--backend", "onnx"),
        (["serve", "M", "--runtime", "torch"], "--runtime", "--backend", "torch"),
        (["export", "M", "--precision", "float16"], "--precision", "--weight-dtype", "float16"),
    ],
)
def test_former_flag_names_work_for_one_release_with_a_warning(capsys, argv, old, new, value):
    from flawmap.cli import build_parser

    with pytest.warns(FutureWarning, match=f"^{old} is deprecated and goes in the next release; use {new}$"):
        args = build_parser().parse_args(argv)
    assert getattr(args, new.removeprefix("--").replace("-", "_")) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name: no warning
        assert getattr(build_parser().parse_args([*argv[:-2], new, value]), new.removeprefix("--").replace("-", "_")) == value
    with pytest.raises(SystemExit):
        build_parser().parse_args([argv[0], "--help"])
    help_text = capsys.readouterr().out
    assert new in help_text and old not in help_text  # the former name is hidden


def test_quiet_silences_progress_bars(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    code, _, err = run_cli(capsys, "predict", tiny_model_dir, tiny_dataset / "test" / "good", "--out", tmp_path / "p", "--quiet")
    assert code == 0 and "predicting" not in err


def fit_help(capsys, *argv):
    """``flawmap fit ... --help``: its text, after the exit argparse makes."""
    with pytest.raises(SystemExit) as done:
        main(["fit", *argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_line(text, flag):
    """The help of ``flag`` in ``text`` (argparse may put it on the next line), whitespace joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} ") or line == f"  {flag}")
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    return " ".join(" ".join(lines[start:end]).split()[len(flag.split()):])


def test_fit_help_of_one_method_lists_its_flags_with_its_defaults(capsys):
    from flawmap.models import METHODS

    rlr = METHODS.get("rlr")()
    text = fit_help(capsys, "--method", "rlr")
    for name in ("epochs", "hidden_dim", "depth", "learning_rate"):
        assert help_line(text, "--" + name.replace("_", "-")).endswith(f"default {getattr(rlr, name)}")
    assert "--coreset-fraction" not in text and "--align" not in text  # patchcore's and fyd's
    assert "--epochs INT default 12" in " ".join(fit_help(capsys, "--method=rlr").split())


def test_fit_help_names_each_methods_default_where_they_differ(capsys):
    from flawmap.models import METHODS

    text = fit_help(capsys)
    trained = sorted(name for name in METHODS.names() if "epochs" in METHODS.get(name)().get_params())
    assert {"fyd", "mkd", "rlr", "students"} <= set(trained)
    epochs = {name: METHODS.get(name)().epochs for name in trained}
    line = help_line(text, "--epochs INT")
    assert line.startswith(f"[{', '.join(trained)}] default ")
    for name, value in epochs.items():
        assert f"{name} {value}" in line or line.startswith(f"[{', '.join(trained)}] default {value}")
    assert help_line(text, "--depth INT") == f"[mkd, rlr] default {METHODS.get('mkd')().depth} (rlr {METHODS.get('rlr')().depth})"
    assert "--coreset-fraction" in text


def test_calibration_fraction_names_the_methods_that_hold_images_out(capsys, tmp_path):
    from flawmap.models import METHODS

    holding = [name for name in METHODS.names() if not METHODS.get(name).traits.cross_fits]
    cross_fitting = [name for name in METHODS.names() if name not in holding]
    assert holding and cross_fitting
    assert help_line(fit_help(capsys), "--calibration-fraction FLOAT").startswith(f"[{', '.join(holding)}] ")

    missing = tmp_path / "missing"
    for method, tiling in itertools.product(cross_fitting, (["--tile-size", "64"], [])):  # tiled fits cross-fit too
        code, _, err = run_cli(capsys, "fit", missing, "--method", method, "--out", tmp_path / "m", "--calibration-fraction", "0.3", *tiling)
        assert_one_line_error(code, err, "--calibration-fraction does not apply", repr(method), "holds no image out")
    code, _, err = run_cli(capsys, "benchmark", missing, "--methods", cross_fitting[0], "--param", f"{cross_fitting[0]}.calibration_fraction=0.3")
    assert_one_line_error(code, err, "calibration_fraction does not apply")
    # where it changes the calibration it is accepted: the fit goes on (to the missing folder)
    for extra in (["--method", holding[0]], ["--method", holding[0], "--tile-size", "64"]):
        code, _, err = run_cli(capsys, "fit", missing, *extra, "--out", tmp_path / "m", "--calibration-fraction", "0.3")
        assert_one_line_error(code, err, "missing")
        assert "calibration-fraction" not in err


def test_export_and_serve_take_quiet(capsys, monkeypatch, tiny_model_dir, tmp_path):
    import flawmap.export
    import flawmap.serve

    # export's progress (its steps on stderr) is shown by the export test above; here: who turns it off
    asked = []
    written = tmp_path / "m.onnx"
    written.write_bytes(b"graph")
    monkeypatch.setattr(flawmap.export, "export_onnx", lambda *args, progress, **options: asked.append(progress) or written)
    for flags, environment in ((["--quiet"], "0"), ([], "0"), ([], "1")):
        monkeypatch.setenv("TQDM_DISABLE", environment)
        code, out, _ = run_cli(capsys, "export", tiny_model_dir, "--out", written, *flags)
        assert code == 0 and "exported" in out
    assert asked == [False, True, False]

    levels = []
    monkeypatch.setattr(flawmap.serve, "serve", lambda app, settings, sock, log_level: levels.append(log_level))
    for flags in (["--quiet"], [], ["--quiet", "--log-level", "debug"]):
        code, out, _ = run_cli(capsys, "serve", tiny_model_dir, "--port", "0", *flags)
        assert code == 0 and "serving patchcore model" in out
    assert levels == ["warning", "info", "debug"]  # --quiet: no log line per request; an explicit level wins


def quick_flags(method):
    """``fit`` flags of ``method``'s quick_params."""
    from flawmap.models import METHODS

    flags = []
    for name, value in METHODS.get(method).quick_params.items():
        flags += ["--" + name.replace("_", "-"), ",".join(value) if isinstance(value, tuple) else str(value)]
    return flags


@pytest.mark.parametrize(
    ("method", "phases"),
    [("patchcore", ["extracting features", "coreset selection", "calibrating: leave-one-out"]),
     ("rlr", ["holding out", "training rlr", "calibrating: held-out images"])],
)
def test_fit_shows_progress_of_every_phase_unless_quiet(capsys, monkeypatch, tiny_dataset, tmp_path, one_torch_thread, method, phases):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    fit = ["fit", tiny_dataset, "--method", method, *quick_flags(method), "--batch-size", "8", "--num-workers", "1"]
    code, _, err = run_cli(capsys, *fit, "--out", tmp_path / "shown")
    assert code == 0 and all(f"{phase}:" in err for phase in phases), err
    if method == "patchcore":  # one quiet fit is enough
        code, _, err = run_cli(capsys, *fit, "--out", tmp_path / "quiet", "--quiet")
        assert code == 0 and not any(phase in err for phase in phases) and "%|" not in err
