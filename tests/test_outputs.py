"""One rule for every output (issue 32, flawmap.outputs): checked before any work, nothing
replaced that flawmap did not write without --force, atomic, created with the process umask."""

from __future__ import annotations

import os
import stat

import pytest

import flawmap.scoring  # noqa: F401  (imported before the fixture patches flawmap.loading.load, which it imports)
from conftest import one_error_line, run_cli
from flawmap.export import is_exported_graph
from flawmap.outputs import is_listed_output

SMALL = ["--image-size", "64", "--batch-size", "8", "--quiet"]


@pytest.fixture
def no_long_work(monkeypatch):
    """Records any start of the long work (loading a model, fitting): the checks come first."""
    started = []
    for target in ("flawmap.models.base.AnomalyModel.partial_fit", "flawmap.export.load_model", "flawmap.loading.load",
                   "flawmap.scoring.load"):
        monkeypatch.setattr(target, lambda *a, **k: started.append(target) or (_ for _ in ()).throw(AssertionError(target)))
    return started


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """A folder the process may not write (os.access says so: tests may run as root, who may)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr("flawmap.outputs.os.access", lambda path, mode: False if str(path) == str(folder) else real_access(path, mode))
    return folder


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


# ---------------------------------------------------------------- checked before any work
def test_export_and_report_into_unwritable_places_fail_at_once(capsys, tiny_dataset, tiny_model_dir, read_only, a_file, no_long_work):
    for out in (read_only / "m.onnx", a_file / "m.onnx"):
        code, _, err = run_cli(capsys, "export", tiny_model_dir, "--out", out)
        assert str(out.parent) in one_error_line(code, err)
    for out in (read_only, a_file / "report"):
        code, _, err = run_cli(capsys, "report", tiny_model_dir, tiny_dataset, "--out", out)
        assert str(out) in one_error_line(code, err)
    code, _, err = run_cli(capsys, "score", tiny_model_dir, tiny_dataset, "--out", read_only / "r.parquet")
    assert "not writable" in one_error_line(code, err)
    assert not no_long_work


def test_fit_onto_a_folder_that_is_not_a_model_is_refused_before_fitting(capsys, tiny_dataset, tmp_path, no_long_work):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--out", tmp_path / "mine", *SMALL)
    assert "is not a flawmap model directory" in one_error_line(code, err)
    assert not no_long_work and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- never replacing what flawmap did not write
def test_export_and_score_do_not_replace_foreign_files(capsys, tiny_dataset, tiny_model_dir, tiny_onnx, tmp_path, no_long_work):
    foreign = tmp_path / "thesis.onnx"
    foreign.write_bytes(b"my own work")
    code, _, err = run_cli(capsys, "export", tiny_model_dir, "--out", foreign)
    assert "is not a graph flawmap exported; give --force" in one_error_line(code, err)
    table = tmp_path / "results.parquet"
    table.write_bytes(b"someone else's table")
    code, _, err = run_cli(capsys, "score", tiny_model_dir, tiny_dataset, "--out", table)
    assert "is not a results table flawmap wrote; give --force" in one_error_line(code, err)
    assert foreign.read_bytes() == b"my own work" and table.read_bytes() == b"someone else's table"
    assert is_exported_graph(tiny_onnx) and not is_exported_graph(foreign)


def test_score_replaces_its_own_table_and_a_foreign_one_with_force(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    table = tmp_path / "results.parquet"
    images = sorted((tiny_dataset / "test" / "good").glob("*.png"))[:2]
    assert run_cli(capsys, "score", tiny_model_dir, *images, "--out", table, "--quiet")[0] == 0
    code, out, err = run_cli(capsys, "score", tiny_model_dir, images[0], "--out", table, "--quiet")
    assert code == 0 and "scored 1 image (" in out, err
    table.write_bytes(b"foreign")
    assert run_cli(capsys, "score", tiny_model_dir, images[0], "--out", table, "--quiet", "--force")[0] == 0


def test_report_keeps_an_index_html_it_did_not_write(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<html>the team's wiki</html>")
    code, _, err = run_cli(capsys, "report", tiny_model_dir, tiny_dataset, "--out", out, "--quiet")
    assert "index.html: exists and is not a report flawmap wrote; give --force" in one_error_line(code, err)
    assert (out / "index.html").read_text() == "<html>the team's wiki</html>"
    assert run_cli(capsys, "report", tiny_model_dir, tiny_dataset, "--out", out, "--quiet", "--force")[0] == 0
    assert run_cli(capsys, "report", tiny_model_dir, tiny_dataset, "--out", out, "--quiet")[0] == 0  # its own: replaced


def test_predict_keeps_files_added_to_its_output(capsys, tiny_dataset, tiny_model_dir, tmp_path):
    images = sorted((tiny_dataset / "test" / "good").glob("*.png"))[:2]
    out = tmp_path / "predictions"
    assert run_cli(capsys, "predict", tiny_model_dir, *images, "--out", out, "--quiet")[0] == 0
    assert is_listed_output(out, "scores.jsonl", "overlay")
    (out / "notes.txt").write_text("line 3 stops here")
    code, _, err = run_cli(capsys, "predict", tiny_model_dir, *images, "--out", out, "--quiet")
    assert "is not an earlier predict output" in one_error_line(code, err)
    assert (out / "notes.txt").is_file()
    assert run_cli(capsys, "predict", tiny_model_dir, images[0], "--out", out, "--quiet", "--force")[0] == 0
    assert sorted(path.name for path in out.iterdir()) == sorted([images[0].name, "scores.jsonl"])


# ---------------------------------------------------------------- modes from the umask
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(root) -> set[int]:
    return {stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]} if root.is_dir() else {stat.S_IMODE(root.stat().st_mode)}


def test_outputs_get_the_modes_of_the_umask(capsys, tiny_dataset, tiny_model, tiny_model_dir, tiny_onnx, tmp_path, umask_022):
    model_dir = tiny_model.save(tmp_path / "model")
    assert modes(model_dir) == {0o755, 0o644}
    images = sorted((tiny_dataset / "test" / "good").glob("*.png"))[:2]
    assert run_cli(capsys, "predict", tiny_model_dir, *images, "--out", tmp_path / "p", "--quiet")[0] == 0
    assert modes(tmp_path / "p") == {0o755, 0o644}
    assert run_cli(capsys, "score", tiny_model_dir, *images, "--out", tmp_path / "r.parquet", "--quiet")[0] == 0
    assert modes(tmp_path / "r.parquet") == {0o644}
    assert run_cli(capsys, "report", tiny_model_dir, tiny_dataset / "test" / "good", "--out", tmp_path / "site", "--quiet")[0] == 0
    assert modes(tmp_path / "site") == {0o755, 0o644}
    # an export writes through the same atomic writer as the model files
    from flawmap.io import write_atomically

    write_atomically(tmp_path / "exported.onnx", tiny_onnx.read_bytes())
    assert modes(tmp_path / "exported.onnx") == {0o644}
