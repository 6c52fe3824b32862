"""The Uninformed Students ablation: teacher (packaged patch networks or frozen backbone features)
x anomaly score (regression error e, predictive uncertainty v, their standardised sum e + v).

For each category and teacher, one model is fitted (the method's defaults otherwise) and its test
split scored once: every scale's error and uncertainty are kept, so the three scores come from the
same students (``score_terms`` only changes how a scale's standardised terms are combined).
Prints a markdown table (per category, mean over categories) and writes the rows as JSON.
Timings depend on the machine's load.

    OMP_NUM_THREADS=1 python benchmarks/bench_students.py DATA/mvtec_ad/bottle DATA/mvtec_ad/screw \\
        DATA/visa/capsules --json /tmp/students/ablation.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from flawmap.cli import format_table
from flawmap.evaluate import evaluate
from flawmap.models import UninformedStudents
from flawmap.models.students import SCORE_TERMS, TEACHERS

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def memoised(scale_terms: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``scale_terms`` that computes each distinct batch of images once (keyed by its bytes)."""
    seen: dict[str, Any] = {}

    def cached(features: Any) -> Any:
        images = features if isinstance(features, torch.Tensor) else features.images
        key = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if key not in seen:
            seen[key] = scale_terms(features)
        return seen[key]

    return cached


def ablation_rows(category: Path, teacher: str, params: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Fit one model of ``teacher`` on ``category``; one row per score (see module docstring)."""
    start = time.perf_counter()
    model = UninformedStudents(teacher=teacher, **params).set_runtime(batch_size=batch_size, num_workers=1).fit(category)
    fit_seconds = time.perf_counter() - start
    model.scorer_.scale_terms = memoised(model.scorer_.scale_terms)
    rows = []
    for score_terms in SCORE_TERMS:
        model.score_terms = model.scorer_.score_terms = score_terms
        result = evaluate(model, category)
        rows.append({"category": category.name, "teacher": teacher, "score": score_terms,
                     **{key: result[key] for key in METRICS}, "fit_s": fit_seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (teacher, score): the mean of each metric over the categories."""
    means = []
    for teacher in TEACHERS:
        for score_terms in SCORE_TERMS:
            group = [row for row in rows if row["teacher"] == teacher and row["score"] == score_terms]
            if group:
                means.append({"category": "mean", "teacher": teacher, "score": score_terms,
                              **{key: sum(row[key] for row in group) / len(group) for key in (*METRICS, "fit_s")}})
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path, metavar="DATA_DIR")
    parser.add_argument("--teachers", default=",".join(TEACHERS), help="comma-separated (default: both)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=JSON", help="a hyper-parameter, e.g. epochs=20")
    parser.add_argument("--batch-size", type=int, default=4, help="inference batch (default 4)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    params = {name: json.loads(value) for name, _, value in (spec.partition("=") for spec in args.param)}
    rows = [row for category in args.data for teacher in args.teachers.split(",") for row in ablation_rows(category, teacher, params, args.batch_size)]
    rows += mean_rows(rows)
    print(format_table(rows, ["category", "teacher", "score", *METRICS, "fit_s"]))
    if args.json:
        args.json.write_text(json.dumps({"params": params, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
