"""Does the threshold mean what it says? Target false-alarm rate against the rate achieved on test/good.

For each category (MVTec bottle and the three demo categories, written to a temporary folder) and
method, one model is fitted with default hyper-parameters; then for each target rate the
threshold is calibrated again from the model's own out-of-sample normal scores
(``calibrate_threshold``, no refit) and the test split is scored once. Reported per row: the
target rate, the calibration (estimator, number of normal scores, 90 % threshold interval), the
achieved false-alarm rate on test/good and the recall on the defect images, and the fit time
with its calibration share. Prints a markdown table and writes JSON.

    python benchmarks/bench_calibration.py                         # bottle + demo, patchcore
    python benchmarks/bench_calibration.py --methods patchcore,padim --rates 0.01,0.05
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import add_methods_flag, default_category, write_rows
from flawmap.cli import format_table
from flawmap.data import make_demo_data, open_dataset
from flawmap.models import create_model

COLUMNS = (
    "category", "method", "target_rate", "achieved_rate", "recall", "n_test_good", "threshold", "estimator",
    "n_normal_scores", "fit_s", "calibration_s",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout categories (default: bottle + demo)")
    add_methods_flag(parser, "patchcore")
    parser.add_argument("--rates", default="0.01,0.05", help="target false-alarm rates (default 0.01,0.05)")
    parser.add_argument("--json", type=Path, default=Path("bench_calibration.json"), help="default ./bench_calibration.json")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="flawmap-calibration-") as folder:
        categories = args.categories or [default_category(), *make_demo_data(Path(folder))]
        for category in categories:
            for method in args.methods:
                rows += measure(category, method, rates)
                print(format_table(rows[-len(rates):], list(COLUMNS)), file=sys.stderr)
    print(format_table(rows, list(COLUMNS)))
    for method in args.methods:
        for rate in rates:
            achieved = [row["achieved_rate"] for row in rows if row["method"] == method and row["target_rate"] == rate]
            print(f"{method} target {rate}: achieved median {statistics.median(achieved):.3f}, max {max(achieved):.3f}")
    write_rows(args.json, categories[0], rows)
    return 0


def measure(category: Path, method: str, rates: list[float]) -> list[dict]:
    """Fit once, then for each rate: calibrate, and the achieved rate and recall on the test split."""
    dataset = open_dataset(category)
    model = create_model(method).set_runtime(progress=False).fit(dataset)
    predictions = model.predict(dataset)
    scores = np.array([prediction.score for prediction in predictions])
    anomalous = np.array([prediction.sample.is_anomalous for prediction in predictions])
    rows = []
    for rate in rates:
        model.false_alarm_rate = rate
        calibration = model.calibrate_threshold()
        flagged = scores > calibration.threshold
        rows.append({
            "category": dataset.name,
            "method": method,
            "target_rate": rate,
            "achieved_rate": float(flagged[~anomalous].mean()),
            "recall": float(flagged[anomalous].mean()),
            "n_test_good": int((~anomalous).sum()),
            "threshold": calibration.threshold,
            "threshold_interval": list(calibration.threshold_interval),
            "estimator": calibration.estimator,
            "n_normal_scores": calibration.n_scores,
            "fit_s": sum(model.fit_seconds_.values()),
            "calibration_s": model.fit_seconds_["calibration"],
        })
    return rows


if __name__ == "__main__":
    sys.exit(main())
