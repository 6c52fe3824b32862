"""Evaluate a fitted model on a dataset's test split (the MVTec protocol).

Pixel metrics are computed at each ground-truth mask's original resolution: anomaly maps are
resized to the mask. Maps are streamed: each is counted into the pixel metrics
(:class:`flawmap.metrics.StreamingPixelMetrics`) and dropped, so memory does not grow with the
number of test images. Optionally every map and score is written out so that the metrics can be
recomputed independently of flawmap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from flawmap.data import Dataset, open_dataset
from flawmap.errors import FlawmapError
from flawmap.metrics import StreamingPixelMetrics, image_metrics
from flawmap.prediction import Predictor
from flawmap.regions import RegionTally

#: The keys of an evaluation result, in order.
RESULT_KEYS = (
    "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max", "pixel_f1_max", "threshold", "false_alarm_rate",
    "recall", "pixel_threshold", "region_recall", "false_regions_per_good_image", "verdict_region_disagreement",
    "n_images", "predict_ms_per_image",
)


def evaluate(
    model: Predictor, dataset: Dataset | str | Path, *, maps_dir: str | Path | None = None
) -> dict[str, float]:
    """Score every test image of ``dataset`` and compute the metrics.

    Parameters
    ----------
    model : a fitted model, torch or exported (any Predictor)
    dataset : Dataset or path to an MVTec-layout category folder
    maps_dir : path, optional
        If given, writes ``<defect_type>/<stem>.npy`` (float32 map at the mask's resolution) per
        test image and ``scores.json`` mapping ``"<defect_type>/<stem>"`` to the image score.

    Returns
    -------
    dict with the keys of :data:`RESULT_KEYS`. ``false_alarm_rate`` and ``recall`` are what the
    model's calibrated ``threshold_`` achieves: the share of normal test images flagged, and of
    anomalous ones (NaN when the split has none of that kind). ``region_recall``,
    ``false_regions_per_good_image`` and ``verdict_region_disagreement`` are what its pixel
    threshold ``map_high_`` achieves (:class:`flawmap.regions.RegionTally`).
    """
    if not isinstance(dataset, Dataset):
        dataset = open_dataset(dataset)
    if not dataset.test:
        raise FlawmapError(f"{dataset.root}: no test images to evaluate on (expected test/<type>/ folders)")
    keys, scores, labels = [], [], []
    pixels = StreamingPixelMetrics()
    regions = RegionTally(model.map_high_)
    counting_seconds = 0.0  # metrics and map files, kept out of the prediction time
    start = time.perf_counter()
    for prediction, mask in model.iter_predictions(dataset.test, load_masks=True):
        counting_start = time.perf_counter()
        keys.append(prediction.sample.key)
        scores.append(prediction.score)
        labels.append(prediction.sample.is_anomalous)
        pixels.add(prediction.anomaly_map, mask)
        regions.add(prediction.anomaly_map, mask, prediction.is_anomalous)
        if maps_dir is not None:
            _write_map(Path(maps_dir), prediction.sample.key, prediction.anomaly_map)
        counting_seconds += time.perf_counter() - counting_start
    predict_ms = 1000.0 * (time.perf_counter() - start - counting_seconds) / len(scores)
    if maps_dir is not None:
        scores_path = Path(maps_dir) / "scores.json"
        scores_path.write_text(json.dumps(dict(zip(keys, scores)), indent=1) + "\n", encoding="utf-8")
    score_array, label_array = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    image = image_metrics(score_array, label_array)
    flagged = score_array > model.threshold_
    pixel = pixels.result()
    result = {
        "image_auroc": image["image_auroc"],
        "pixel_auroc": pixel["pixel_auroc"],
        "aupro": pixel["aupro"],
        "pixel_ap": pixel["pixel_ap"],
        "image_f1_max": image["image_f1_max"],
        "pixel_f1_max": pixel["pixel_f1_max"],
        "threshold": float(model.threshold_),
        "false_alarm_rate": _share(flagged[~label_array]),
        "recall": _share(flagged[label_array]),
        "pixel_threshold": float(model.map_high_),
        **regions.result(),
        "n_images": len(scores),
        "predict_ms_per_image": predict_ms,
    }
    return {key: result[key] for key in RESULT_KEYS}


def _share(flags: np.ndarray) -> float:
    """The share of True in ``flags``; NaN when empty."""
    return float(flags.mean()) if flags.size else float("nan")


def _write_map(maps_dir: Path, key: str, anomaly_map: np.ndarray) -> None:
    path = maps_dir / f"{key}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, anomaly_map.astype(np.float32, copy=False))
