"""Thresholds from tens of good images: do the calibration scores stand for new good images, and
what false-alarm rate and recall do the thresholds give?

For each category, method and number of training images (a seeded random subset of train/good,
or all of it), one model is fitted with default hyper-parameters. Then:

- two-sample check: the model's out-of-sample normal scores (``calibration_scores_``: cross-fit or
  held-out) against the scores of good images it never saw (test/good plus up to
  ``--extra-good`` of the unused train/good images), by a two-sided Kolmogorov-Smirnov test at
  level ``LEVEL`` (``ks_p``); also against each part alone (``ks_p_unused_train``, none when all
  train/good images were used; ``ks_p_test_good``), since test/good may differ from train/good
  (on bottle it does: PatchCore's scores of unused train/good and of test/good images, p = 0.007);
- for each target rate the threshold is calibrated again from the same scores (no refit) and
  the test split is scored once: the achieved false-alarm rate on test/good, the recall on the
  defect images, and the best recall of any threshold whose false-alarm rate on test/good is at
  most the achieved one (so ``recall / best_recall`` says whether the threshold is needlessly high).

Prints a markdown table and writes JSON: the rows, and per fit the scores behind them
(``--rescore`` recomputes the rows from those, e.g. after a change of the estimator, without fitting).

    OMP_NUM_THREADS=1 python benchmarks/bench_few_images.py --methods patchcore,padim
    python benchmarks/bench_few_images.py --methods padim --sizes 20 ../shared/data/visa/capsules
    python benchmarks/bench_few_images.py --rescore bench_few_images.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp

from common import SHARED_BOTTLE, add_methods_flag
from flawmap.calibration import CalibrationWarning, calibrate_threshold
from flawmap.cli import format_table
from flawmap.data import open_dataset
from flawmap.models import create_model

#: The three kept categories beside the checkout.
CATEGORIES = (SHARED_BOTTLE, SHARED_BOTTLE.parents[1] / "mvtec_ad" / "screw", SHARED_BOTTLE.parents[1] / "visa" / "capsules")
#: Level of the two-sample test.
LEVEL = 0.01
COLUMNS = (
    "category", "method", "n_train", "target_rate", "calibrated_rate", "achieved_rate", "recall", "best_recall",
    "ks_p", "ks_p_unused_train", "ks_p_test_good", "calibration_median", "unseen_good_median", "threshold", "estimator",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout categories (default: bottle, screw, capsules)")
    add_methods_flag(parser, "patchcore,padim")
    parser.add_argument("--sizes", default="20,40,all", help="training images per fit (default 20,40,all)")
    parser.add_argument("--rates", default="0.05,0.01", help="target false-alarm rates (default 0.05,0.01)")
    parser.add_argument("--extra-good", type=int, default=40, help="unused train/good images scored as unseen (default 40)")
    parser.add_argument("--json", type=Path, default=Path("bench_few_images.json"), help="default ./bench_few_images.json")
    parser.add_argument("--rescore", type=Path, help="recompute the rows from the scores in this JSON (no fitting)")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    categories = args.categories or list(CATEGORIES)
    if args.rescore:
        fits = json.loads(args.rescore.read_text())["fits"]
    else:
        fits = []
        for category in categories:
            for size in distinct_sizes(category, args.sizes):
                for method in args.methods:
                    fits.append(measure(category, method, size, args.extra_good))
                    print(format_table(rows_of(fits[-1], rates), list(COLUMNS)), file=sys.stderr, flush=True)
    rows = [row for fit in fits for row in rows_of(fit, rates)]
    print(format_table(rows, list(COLUMNS)))
    args.json.write_text(results_json(rows, fits))
    print(f"\nwrote {args.json}")
    return 0


def results_json(rows: list[dict], fits: list[dict]) -> str:
    """The rows one field a line, the fits (long score lists) one a line."""
    head = json.dumps({"level": LEVEL, "rows": rows}, indent=1)
    fit_lines = ",\n  ".join(json.dumps(fit) for fit in fits)
    return head[: -len("\n}")] + f',\n "fits": [\n  {fit_lines}\n ]\n}}\n'


def distinct_sizes(category: Path, sizes: str) -> list[int]:
    """``"20,40,all"`` -> training-image counts for ``category``, each at most its train/good size, once."""
    available = len(open_dataset(category).train)
    counts = [available if size == "all" else min(int(size), available) for size in sizes.split(",")]
    return sorted(set(counts))


def measure(category: Path, method: str, size: int, extra_good: int) -> dict:
    """Fit on ``size`` training images (a seeded random subset); the scores the rows need."""
    dataset = open_dataset(category)
    order = np.random.default_rng(0).permutation(len(dataset.train))
    train = [dataset.train[i] for i in order[:size]]
    unused = [dataset.train[i] for i in order[size:]][:extra_good]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        model = create_model(method).set_runtime(progress=False).fit(train)
    predictions = model.predict(list(dataset.test))
    return {
        "category": dataset.name, "method": method, "n_train": size,
        "calibration_scores": list(model.calibration_scores_),
        "test_good_scores": [p.score for p in predictions if not p.sample.is_anomalous],
        "defect_scores": [p.score for p in predictions if p.sample.is_anomalous],
        "unused_train_scores": [p.score for p in model.predict(unused)] if unused else [],
    }


def rows_of(fit: dict, rates: list[float]) -> list[dict]:
    """The two-sample check and, per rate, the achieved false-alarm rate and recall of one fit."""
    calibration_scores = np.asarray(fit["calibration_scores"])
    good, defect = np.asarray(fit["test_good_scores"]), np.asarray(fit["defect_scores"])
    unused = np.asarray(fit["unused_train_scores"])
    unseen = np.concatenate([good, unused])
    common = {
        "category": fit["category"], "method": fit["method"], "n_train": fit["n_train"],
        "ks_p": float(ks_2samp(calibration_scores, unseen).pvalue),
        "ks_p_unused_train": float(ks_2samp(calibration_scores, unused).pvalue) if unused.size else None,
        "ks_p_test_good": float(ks_2samp(calibration_scores, good).pvalue),
        "calibration_median": float(np.median(calibration_scores)), "unseen_good_median": float(np.median(unseen)),
        "n_calibration_scores": int(calibration_scores.size), "n_unseen_good": int(unseen.size),
    }
    rows = []
    for rate in rates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            calibration = calibrate_threshold(calibration_scores, rate, source="benchmark")
        achieved = float(np.mean(good > calibration.threshold))
        rows.append({
            **common,
            "target_rate": rate,
            "calibrated_rate": calibration.false_alarm_rate,
            "achieved_rate": achieved,
            "recall": float(np.mean(defect > calibration.threshold)),
            "best_recall": best_recall(good, defect, achieved),
            "threshold": calibration.threshold,
            "threshold_interval": list(calibration.threshold_interval),
            "estimator": calibration.estimator,
        })
    return rows


def best_recall(good: np.ndarray, defect: np.ndarray, false_alarm_rate: float) -> float:
    """The largest recall on ``defect`` scores of any threshold that flags at most
    ``false_alarm_rate`` of the ``good`` scores."""
    candidates = np.concatenate([good, [np.inf]])
    allowed = [t for t in candidates if np.mean(good > t) <= false_alarm_rate]
    return float(np.mean(defect > min(allowed)))


if __name__ == "__main__":
    sys.exit(main())
