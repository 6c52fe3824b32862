"""write_predictions (flawmap.prediction_folder): predictions to a folder, from Python as from `flawmap predict`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flawmap.errors import FlawmapError
from flawmap.prediction_folder import SCORES_FILE, write_predictions


def test_write_predictions_writes_an_overlay_and_a_record_per_image(tiny_model, tiny_dataset, tmp_path):
    out = tmp_path / "predictions"
    written = write_predictions(tiny_model, tiny_dataset / "test", out, recursive=True)
    images = sorted((tiny_dataset / "test").glob("*/*.png"))
    expected = {str(prediction.sample.image_path): prediction for prediction in tiny_model.predict(images)}
    records = [json.loads(line) for line in (out / SCORES_FILE).read_text().splitlines()]
    assert written.n_scored == len(records) == len(images) and written.out == out
    assert written.n_anomalous == sum(prediction.is_anomalous for prediction in expected.values()) > 0
    for record in records:
        prediction = expected[record["path"]]
        assert record["score"] == prediction.score and record["is_anomalous"] == prediction.is_anomalous
        assert record["threshold"] == tiny_model.threshold_ and record["pixel_threshold"] == tiny_model.map_high_
        assert record["regions"] == [region.to_json() for region in prediction.regions]
        assert record["overlay"] == Path(record["path"]).relative_to(tiny_dataset / "test").as_posix()  # good/000.png
        assert (out / record["overlay"]).is_file()


def test_a_failed_write_leaves_the_folder_as_it_was(tiny_model, tiny_dataset, tmp_path):
    out = tmp_path / "predictions"
    good = sorted((tiny_dataset / "test" / "good").glob("*.png"))
    write_predictions(tiny_model, good[:2], out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(FlawmapError, match="broken.png"):
        write_predictions(tiny_model, [good[2], broken], out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.png", "predictions"]  # no staging folder left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FlawmapError, match="is not an earlier predict output"):
        write_predictions(tiny_model, good[:1], out)
    assert write_predictions(tiny_model, good[:1], out, force=True).n_scored == 1 and not (out / "notes.txt").exists()
