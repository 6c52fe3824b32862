"""Tests for flawmap.evaluate: streamed metrics equal the exact ones, maps are not all held."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from flawmap import postprocess
from flawmap.evaluate import RESULT_KEYS, evaluate
from flawmap.data import open_dataset
from flawmap.metrics import image_metrics, pixel_metrics


def test_evaluate_equals_exact_metrics_of_the_predictions(tiny_model, tiny_dataset):
    result = evaluate(tiny_model, tiny_dataset)
    assert list(result) == list(RESULT_KEYS)
    predictions, masks = zip(*tiny_model.iter_predictions(open_dataset(tiny_dataset).test, load_masks=True))
    exact = pixel_metrics([prediction.anomaly_map for prediction in predictions], list(masks))
    scores = np.array([prediction.score for prediction in predictions])
    labels = np.array([prediction.sample.is_anomalous for prediction in predictions])
    exact |= image_metrics(scores, labels)
    for name, value in exact.items():
        if name in RESULT_KEYS:
            assert result[name] == pytest.approx(value, rel=1e-12), name
    assert result["n_images"] == len(predictions)
    good = [prediction for prediction in predictions if not prediction.sample.is_anomalous]
    assert result["false_regions_per_good_image"] == pytest.approx(np.mean([len(p.regions) for p in good]))
    disagreeing = [p.is_anomalous != bool(p.regions) for p in predictions]
    assert result["verdict_region_disagreement"] == pytest.approx(np.mean(disagreeing))
    assert result["pixel_threshold"] == tiny_model.map_high_ and 0.0 <= result["region_recall"] <= 1.0


def test_evaluate_holds_few_full_size_maps_at_once(tiny_model, tiny_dataset, monkeypatch):
    """Every full-size map is released once counted: at most one batch of them is alive."""
    alive, most_alive = set(), [0]
    resize = postprocess.to_original_size

    def tracked_resize(anomaly_map, original_hw):
        full_map = resize(anomaly_map, original_hw)
        alive.add(id(full_map))
        weakref.finalize(full_map, alive.discard, id(full_map))
        most_alive[0] = max(most_alive[0], len(alive))
        return full_map

    monkeypatch.setattr(postprocess, "to_original_size", tracked_resize)
    tiny_model.set_runtime(batch_size=2)
    try:
        result = evaluate(tiny_model, tiny_dataset)
    finally:
        tiny_model.set_runtime(batch_size=8)
    assert result["n_images"] > 4
    assert most_alive[0] <= 2
