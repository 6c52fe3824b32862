"""flawmap score: one Parquet row per image, equal to ``model.predict``, from the local engine and
from Ray Data (decode tasks, model actors) on a local 2-CPU Ray instance; bad files become error
rows; a model actor killed mid-run loses no row."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

import flawmap
from flawmap.cli import main
from flawmap.models import load_model
from flawmap.runtime import Runtime
from flawmap.scoring import RESULT_SCHEMA, ParquetRows, RaySettings, score_files

#: The process title Ray gives the model actors of ``flawmap score``.
ACTOR_TITLE = b"ray::MapWorker(MapBatches(ModelScorer))"
EXACT = ["--precision", "float32", "--quiet"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, on its context


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def test_images(tiny_dataset):
    return sorted((tiny_dataset / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A file that is no image, and an image smaller than the model's patch grid."""
    folder = tmp_path_factory.mktemp("bad")
    corrupt, tiny = folder / "corrupt.png", folder / "tiny.png"
    corrupt.write_bytes(b"not an image")
    Image.new("RGB", (2, 2)).save(tiny)
    return corrupt, tiny


@pytest.fixture(scope="module")
def expected(tiny_model_dir, test_images):
    """path -> the Prediction of ``model.predict``."""
    model = load_model(tiny_model_dir, precision="float32")
    return {str(path): prediction for path, prediction in zip(test_images, model.predict(test_images))}


def read_rows(path):
    table = pq.read_table(path)
    assert table.schema.equals(RESULT_SCHEMA)
    return table.to_pylist()


def assert_rows_match(rows, expected):
    """Each row of a scored image has the score, flag, threshold and map statistics of its Prediction,
    and its map file (when written) holds the map."""
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows)
    for path, prediction in expected.items():
        row = by_path[path]
        assert row["error"] is None
        assert row["score"] == pytest.approx(prediction.score, rel=1e-5)
        assert row["is_anomalous"] == prediction.is_anomalous
        assert row["map_max"] == pytest.approx(float(prediction.anomaly_map.max()), rel=1e-5)
        assert row["map_mean"] == pytest.approx(float(prediction.anomaly_map.mean()), rel=1e-5)
        assert [region["box"] for region in row["regions"]] == [list(region.box) for region in prediction.regions]
        if row["map_path"] is not None:
            np.testing.assert_allclose(np.load(row["map_path"]), prediction.anomaly_map, rtol=1e-5, atol=1e-6)
    assert len({row["threshold"] for row in rows if row["error"] is None}) == 1
    assert len({row["pixel_threshold"] for row in rows if row["error"] is None}) == 1


def assert_error_rows(rows, corrupt, tiny):
    by_path = {row["path"]: row for row in rows}
    assert "not an image" in by_path[str(corrupt)]["error"] and str(corrupt) in by_path[str(corrupt)]["error"]
    assert "smaller than" in by_path[str(tiny)]["error"] and by_path[str(tiny)]["error"].startswith(str(tiny))
    for path in (corrupt, tiny):
        assert all(by_path[str(path)][column] is None for column in RESULT_SCHEMA.names if column not in ("path", "error"))


# ---------------------------------------------------------------- local engine (no Ray)
def test_local_engine_without_ray_gives_predict_rows_in_order(
    capsys, monkeypatch, tiny_model_dir, tiny_dataset, test_images, bad_files, expected, tmp_path
):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" fails: the local engine must not need it
    corrupt, tiny = bad_files
    listed = tmp_path / "more.txt"
    listed.write_text(f"# one path a line\n{corrupt}\n\n{tiny}\n")
    out, maps = tmp_path / "scores.parquet", tmp_path / "maps"
    code = main([str(arg) for arg in ("score", tiny_model_dir, tiny_dataset / "test", listed, "--out", out, "--maps-dir", maps, "--batch-size", "4", *EXACT)])
    assert code == 0
    assert f"scored {len(test_images) + 2} images" in capsys.readouterr().out
    rows = read_rows(out)
    assert [row["path"] for row in rows] == [*map(str, test_images), str(corrupt), str(tiny)]
    assert_rows_match(rows, expected)
    assert_error_rows(rows, corrupt, tiny)
    for row in rows[: len(test_images)]:  # maps keep the images' paths below the inputs' common folder
        image = Path(row["path"])
        assert row["map_path"].startswith(str(maps)) and row["map_path"].endswith(f"/test/{image.parent.name}/{image.stem}.npy")
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("flags, message, ray_installed", [
    (["--engine", "ray"], 'needs Ray', False),
    (["--actors", "2"], "--actors applies to --engine ray only", True),
    (["--engine", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there", True),
])
def test_ray_problems_are_one_line_errors_before_any_output(capsys, monkeypatch, tiny_model_dir, test_images, tmp_path, flags, message, ray_installed):
    if not ray_installed:
        monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "scores.parquet"
    code = main([str(arg) for arg in ("score", tiny_model_dir, test_images[0], "--out", out, *flags)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_parquet_rows_are_row_groups_and_appear_only_when_complete(tmp_path):
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"an earlier result")
    rows = [{"path": f"{index}.png", "error": "bad"} for index in range(5)]
    with pytest.raises(RuntimeError):
        with ParquetRows(out, row_group_rows=2) as writer:
            writer.write(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"an earlier result" and [path.name for path in tmp_path.iterdir()] == [out.name]
    with ParquetRows(out, row_group_rows=2) as writer:
        for row in rows:
            writer.write(pa.Table.from_pylist([row], schema=RESULT_SCHEMA))
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 2 + 2 + the last 1
    assert read_rows(out) == [{**dict.fromkeys(RESULT_SCHEMA.names), **row} for row in rows]


# ---------------------------------------------------------------- Ray engine
def test_ray_engine_gives_predict_rows_and_error_rows(capsys, local_ray, tiny_model_dir, tiny_dataset, bad_files, expected, tmp_path):
    corrupt, tiny = bad_files
    out, maps = tmp_path / "scores.parquet", tmp_path / "maps"
    argv = ("score", tiny_model_dir, tiny_dataset / "test", corrupt, tiny, "--out", out, "--maps-dir", maps, "--engine", "ray", "--batch-size", "4")
    code = main([str(arg) for arg in (*argv, *EXACT)])
    assert code == 0, capsys.readouterr().err
    rows = read_rows(out)
    assert sorted(row["path"] for row in rows) == sorted([*expected, str(corrupt), str(tiny)])
    assert_rows_match(rows, expected)
    assert_error_rows(rows, corrupt, tiny)
    assert all(row["map_path"] is not None for row in rows if row["error"] is None)


class ActorKiller(threading.Thread):
    """Kills the model actor's process (SIGKILL) as soon as the first map file appears in ``maps``."""

    def __init__(self, maps, timeout_s=120.0):
        super().__init__(daemon=True)
        self.maps, self.deadline = maps, time.monotonic() + timeout_s
        self.killed_pid, self.maps_before_kill = None, None

    def run(self):
        while time.monotonic() < self.deadline:
            written = list(self.maps.rglob("*.npy")) if self.maps.is_dir() else []
            actors = [pid for pid in _pids() if _cmdline(pid).startswith(ACTOR_TITLE)]
            if written and actors:
                self.maps_before_kill = len(written)
                os.kill(actors[0], signal.SIGKILL)
                self.killed_pid = actors[0]
                return
            time.sleep(0.005)


def _pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def test_killing_the_model_actor_mid_run_loses_no_row(local_ray, tiny_onnx, test_images, tmp_path):
    """With the exported model: its actors start without importing torch, which the restart repeats."""
    expected = dict(zip(map(str, test_images), flawmap.load(tiny_onnx).predict(test_images)))
    maps = tmp_path / "maps"
    killer = ActorKiller(maps)
    killer.start()
    summary = score_files(
        tiny_onnx, test_images, tmp_path / "scores.parquet", engine="ray", maps_dir=maps,
        runtime=Runtime(batch_size=2), cluster=RaySettings(actors=1),
    )
    killer.join()
    assert killer.killed_pid is not None and killer.maps_before_kill < len(test_images)  # killed mid-run
    assert summary.n_images == len(test_images) and summary.n_errors == 0
    rows = read_rows(summary.out)
    assert sorted(row["path"] for row in rows) == sorted(expected)
    assert_rows_match(rows, expected)
