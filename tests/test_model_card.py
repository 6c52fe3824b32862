"""The model card (flawmap.model_card): one description that info, serve and the report all show."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import onnx
from fastapi.testclient import TestClient

import flawmap
from conftest import run_cli
from flawmap.model_card import CARD_METADATA_KEY, NOT_RECORDED, model_card
from flawmap.serve import create_app, load_served_model

#: Keys the server adds to the card: what runs it here, not what the model is.
SERVER_KEYS = {"backend", "device", "flawmap_version", "settings"}


def report_card(page: str) -> tuple[dict[str, str], dict[str, str]]:
    """The report's model card: its facts and its hyper-parameters, label -> text."""
    section = page[page.index("<h2>Model card</h2>"):]
    facts_table, params_table = re.findall(r'<table class="card-table">(.*?)</table>', section)
    rows = lambda table: {html.unescape(key): html.unescape(value.replace("<br>", "\n"))  # noqa: E731
                          for key, value in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table)}
    return rows(facts_table), rows(params_table)


def test_info_serve_and_report_show_the_same_card(capsys, tiny_model_dir, tiny_dataset, tmp_path):
    code, text, _ = run_cli(capsys, "info", tiny_model_dir)
    assert code == 0
    code, out, _ = run_cli(capsys, "info", tiny_model_dir, "--json", "-")
    info = json.loads(out)
    with TestClient(create_app(load_served_model(tiny_model_dir))) as client:
        served = client.get("/v1/model").json()
    assert set(served) - set(info) == SERVER_KEYS and {key: served[key] for key in info} == info

    code, _, _ = run_cli(capsys, "report", tiny_model_dir, tiny_dataset, "--out", tmp_path / "report", "--quiet")
    assert code == 0
    facts, params = report_card((tmp_path / "report" / "index.html").read_text(encoding="utf-8"))
    printed = dict(line.split(": ", 1) for line in text.splitlines() if not line.startswith("  "))
    assert set(printed) == {*facts, "parameters"}
    assert all(f"{label}: {value}" in text for label, value in facts.items())  # every fact, to the last digit
    assert params == {name: str(value) for name, value in info["params"].items()}

    model = flawmap.load(tiny_model_dir)
    assert (info["threshold"], info["pixel_threshold"], info["n_train_images"]) == (model.threshold_, model.map_high_, model.n_train_images_)
    assert info["model_hash"] == flawmap.io.model_directory_digest(tiny_model_dir) and info["format_version"] == str(flawmap.io.FORMAT_VERSION)
    assert f"threshold: {model.threshold_:.6g} (90% interval" in text and facts["training images"] == "12 images in 1 fit(s)"


def test_an_exported_graph_has_the_card_of_its_directory(capsys, tiny_model_dir, tiny_onnx, tmp_path):
    directory = model_card(flawmap.load(tiny_model_dir), tiny_model_dir)
    exported = model_card(flawmap.load(tiny_onnx))
    code, out, _ = run_cli(capsys, "info", tiny_onnx, "--json", "-")  # info takes an exported graph too
    assert code == 0 and json.loads(out) == exported.to_json()
    assert exported.fitted_record() == directory.fitted_record()
    shared = ("method", "image_size", "tile_size", "threshold", "pixel_threshold", "overlay_scale", "model_hash")
    assert all(getattr(exported, name) == getattr(directory, name) for name in shared)
    # an export's params carry the tile size the fit chose ("auto" resolved): the rest is the same
    assert {**exported.params, "tile_size": "auto"} == directory.params and exported.params["tile_size"] == directory.tile_size
    assert (exported.kind, directory.kind) == ("exported graph", "model directory")
    assert exported.export["weight_dtype"] == "float32" and exported.export["batch"] == "dynamic" and directory.export is None

    graph = onnx.load(tiny_onnx)  # a graph exported before the record existed
    kept = [entry for entry in graph.metadata_props if entry.key != CARD_METADATA_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    older = tmp_path / "older.onnx"
    onnx.save(graph, older)
    facts = dict(model_card(flawmap.load(older)).facts())
    assert facts["training images"] == NOT_RECORDED and facts["calibrated on"] == NOT_RECORDED
    assert facts["threshold"] == f"{directory.threshold:.6g}"


def test_the_card_reads_the_tiling_the_fit_chose(tiny_model):
    card = model_card(tiny_model)
    assert card.tile_size is None and dict(card.facts())["tiling"] == (
        f"none: each image is resized to 64 x 64 ({tiny_model.tiling_reason_})"
    )
    tiled = dataclasses.replace(tiny_model, tile_size=256, tile_overlap=32)
    tiled.__dict__.update({name: value for name, value in vars(tiny_model).items() if name.endswith("_")})
    tiled.tile_size_, tiled.tiling_reason_ = 256, "tiles of 256 px as given"
    card = model_card(tiled)
    assert (card.tile_size, card.tile_overlap) == (256, 32)
    facts = dict(card.facts())
    assert facts["tiling"] == "256 px tiles at native resolution, overlapping by at least 32 px (tiles of 256 px as given)"
    assert facts["training images"] == "12 tiles in 1 fit(s)" and facts["model"] == "torch model (its directory not given)"
