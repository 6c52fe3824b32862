"""Resized against tiled models on real high-resolution categories (the study in docs/tiling.md).

One cell per call: fit a model on a category's ``train/good`` (resized to ``--image-size``, or cut
into ``--tile-size`` tiles, or ``auto``), evaluate it on ``test`` (image / pixel AUROC, AUPRO) and
measure its calibration: the false-alarm rate on ``test/good`` of the thresholds calibrated at 5 %
and 1 % from the model's own out-of-sample normal scores (both targets from one fit: the normal
scores do not depend on the target), with those scores and the test/good scores beside them, so
that their distributions can be compared. The cell is merged into the JSON file (one row per
category x method x mode), so cells can run one at a time, in any order.

    OMP_NUM_THREADS=1 python benchmarks/study_tiling.py ../shared/data/mvtec_ad/screw --tile-size 256
    OMP_NUM_THREADS=1 python benchmarks/study_tiling.py ../shared/data/mvtec_ad/screw --tile-size none
    python benchmarks/study_tiling.py --table x   # the rows so far as a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flawmap.calibration import CalibrationWarning, calibrate_threshold
from flawmap.cli import format_table
from flawmap.evaluate import evaluate
from flawmap.models import create_model

#: False-alarm targets whose achieved rates on test/good are reported.
TARGETS = (0.05, 0.01)
#: Columns of the printed table.
TABLE_COLUMNS = ["category", "method", "mode", "image_auroc", "pixel_auroc", "aupro", "far_at_5pct", "far_at_1pct",
                 "n_normal_scores", "fit_s", "predict_ms_per_image"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", type=Path)
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--tile-size", default="none", help="pixels, 'auto' or 'none' (resize)")
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method hyper-parameter (JSON value)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tiling_study.json")
    parser.add_argument("--table", action="store_true", help="print the JSON file's rows as a markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(format_table(json.loads(args.json.read_text())["rows"], TABLE_COLUMNS))
        return 0
    tile_size = None if args.tile_size == "none" else args.tile_size if args.tile_size == "auto" else int(args.tile_size)
    params = {name: json.loads(value) for name, _, value in (spec.partition("=") for spec in args.param)}
    row = run_cell(args.category, args.method, params, tile_size, args.tile_overlap, args.image_size, args.batch_size)
    print(format_table([row], TABLE_COLUMNS))
    merge_row(args.json, row)
    return 0


def run_cell(
    category: Path, method: str, params: dict, tile_size: int | str | None, overlap: int, image_size: int, batch_size: int
) -> dict:
    """Fit and evaluate one model; its table row (with the normal and test/good scores)."""
    model = create_model(method, image_size=image_size, tile_size=tile_size, tile_overlap=overlap, **params)
    model.set_runtime(batch_size=batch_size, progress=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        model.fit(category)
    fit_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as maps:
        result = evaluate(model, category, maps_dir=maps)
        test_scores = json.loads((Path(maps) / "scores.json").read_text())
    good = np.array([score for key, score in test_scores.items() if key.startswith("good/")])
    normal = np.asarray(model.calibration_scores_)
    row = {
        "category": category.name,
        "method": method,
        "mode": ("resize" if model.tiling() is None else f"tiled {model.tiling().size}/{overlap}")
        + "".join(f" {name}={value}" for name, value in params.items()),
        "tile_size": tile_size,
        "tiling_reason": getattr(model, "tiling_reason_", None),
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for target in TARGETS:
            calibration = calibrate_threshold(normal, target, source="study")
            row[f"far_at_{round(target * 100)}pct"] = float(np.mean(good > calibration.threshold))
            row[f"estimator_at_{round(target * 100)}pct"] = calibration.estimator
    row.update({
        "n_normal_scores": int(normal.size),
        "n_test_good": int(good.size),
        "calibration_source": model.calibration_.source,
        "n_train_units": model.n_train_images_,
        "fit_s": fit_seconds,
        "fit_seconds": model.fit_seconds_,
        "predict_ms_per_image": result["predict_ms_per_image"],
        "normal_scores": sorted(normal.tolist()),
        "test_good_scores": sorted(good.tolist()),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    })
    return row


def merge_row(path: Path, row: dict) -> None:
    """Add ``row`` to the rows in ``path``, replacing the row of the same category, method and mode."""
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    same = lambda other: all(other[key] == row[key] for key in ("category", "method", "mode"))
    rows = [other for other in rows if not same(other)] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
