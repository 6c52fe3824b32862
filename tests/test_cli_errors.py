"""Every subcommand, given bad arguments, ends in one ``flawmap: error:`` line and a non-zero exit,
never a traceback (issue 32). The cases fail before any long work, so the sweep is fast."""

from __future__ import annotations

import pytest

from flawmap.cli import main

#: (subcommand and arguments, a fragment of the error line). Placeholders: MODEL (a fitted model
#: directory), DATA (a dataset), IMAGE (one good image), FILE (a plain file), MISSING (no such
#: path), OUT (a new path), ONNX (a file named .onnx that is not a model directory).
CASES = [
    ([], "required: COMMAND"),
    (["fitt"], "invalid choice: 'fitt'"),
    (["fit"], "required: DATA_DIR"),
    (["fit", "DATA"], "give --out"),
    (["fit", "DATA", "--out", "OUT", "--method", "nope"], "unknown method"),
    (["fit", "DATA", "--out", "OUT", "--coreset-fraction", "x"], "invalid float value"),
    (["fit", "DATA", "--out", "OUT", "--coreset-fraction", "2"], "coreset_fraction"),
    (["fit", "MISSING", "--out", "OUT"], "MISSING"),
    (["fit", "DATA", "--out", "FILE/m"], "is a file, not a folder"),
    (["fit", "DATA", "--out", "OUT", "--batch-size", "0"], "batch_size"),
    (["fit", "DATA", "--out", "OUT", "--device", "tpu"], "tpu"),
    (["evaluate", "MODEL"], "required: DATA_DIR"),
    (["evaluate", "MISSING", "DATA"], "MISSING"),
    (["evaluate", "MODEL", "DATA", "--backend", "jax"], "invalid choice: 'jax'"),
    (["evaluate", "MODEL", "MISSING"], "MISSING"),
    (["predict", "MODEL", "IMAGE"], "required: --out"),
    (["predict", "MODEL", "IMAGE", "--out", "OUT", "--threshold", "nan"], "finite"),
    (["predict", "MODEL", "IMAGE", "--out", "OUT", "--threshold", "-5"], "below 0"),
    (["predict", "MODEL", "MISSING", "--out", "OUT"], "MISSING"),
    (["predict", "MODEL", "IMAGE", "--out", "FILE"], "is a file, not a folder"),
    (["predict", "FILE", "IMAGE", "--out", "OUT"], "FILE"),
    (["info", "MISSING"], "no such model directory or .onnx file"),
    (["info", "ONNX"], "not a readable ONNX model"),
    (["info", "MODEL", "--json", "FILE/x.json"], "FILE"),
    (["calibrate", "MODEL"], "give GOOD_DIR"),
    (["calibrate", "MODEL", "IMAGE", "--false-alarm-rate", "2"], "false_alarm_rate"),
    (["calibrate", "MODEL", "IMAGE"], "at least 10"),
    (["calibrate", "MODEL", "DATA", "--out", "FILE"], "FILE"),
    (["export", "MISSING"], "MISSING"),
    (["export", "MODEL", "--batch", "zero"], "expected 'dynamic' or an integer"),
    (["export", "MODEL", "--batch", "0"], "batch must be"),
    (["export", "MODEL", "--opset", "3"], "opset"),
    (["export", "MODEL", "--out", "DATA"], "is a directory"),
    (["export", "MODEL", "--out", "MISSING/x.onnx"], "folder does not exist"),
    (["demo", "--method", "nope"], "unknown method"),
    (["demo-data"], "required: OUT_DIR"),
    (["demo-data", "FILE/demo"], "FILE"),
    (["benchmark", "DATA", "--methods", "nope"], "nope"),
    (["benchmark", "DATA", "--param", "bad"], "METHOD.NAME=VALUE"),
    (["serve", "MODEL", "--port", "99999"], "0..65535"),
    (["serve", "MODEL", "--port", "x"], "invalid int value"),
    (["serve", "MODEL", "--port", "0", "--max-batch", "0"], "max_batch"),
    (["serve", "MODEL", "--port", "0", "--max-upload-mb", "nan"], "max_upload_mb"),
    (["serve", "MISSING", "--port", "0"], "MISSING"),
    (["report", "MODEL", "DATA"], "required: --out"),
    (["report", "MODEL", "DATA", "--out", "FILE/r"], "FILE"),
    (["report", "MISSING", "DATA", "--out", "OUT"], "MISSING"),
    (["score", "MODEL", "IMAGE", "--out", "OUT", "--engine", "spark"], "invalid choice: 'spark'"),
    (["score", "MODEL", "IMAGE", "--out", "OUT", "--address", "x"], "--engine ray only"),
    (["score", "MODEL", "MISSING", "--out", "OUT"], "MISSING"),
    (["score", "MODEL", "IMAGE", "--out", "DATA"], "is a folder, not a file"),
]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(argv) or "(none)" for argv, _ in CASES])
def test_bad_arguments_end_in_one_error_line(capsys, tiny_dataset, tiny_model_dir, tmp_path, argv, fragment):
    (tmp_path / "plain.txt").write_text("not a folder, not a model")
    (tmp_path / "fake.onnx").write_text("not a model directory")
    places = {
        "MODEL": tiny_model_dir, "DATA": tiny_dataset, "IMAGE": next((tiny_dataset / "test" / "good").glob("*.png")),
        "FILE": tmp_path / "plain.txt", "MISSING": tmp_path / "missing", "OUT": tmp_path / "out", "ONNX": tmp_path / "fake.onnx",
    }
    def place(arg: str) -> str:
        head, _, tail = arg.partition("/")
        return str(places[head] / tail if tail else places[head]) if head in places else arg

    code = main([place(arg) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flawmap: error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert place(fragment) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_one_version_everywhere():
    """The package metadata takes its version from flawmap/_version.py, which the CLI, the server,
    model files and exports read: one source (the metadata said 0.1.0 while the CLI said 0.2.0)."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flawmap._version.__version__"}
