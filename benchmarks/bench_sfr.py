"""Benchmark SFR against PatchCore at equal bank sizes, and SFR's sparse sampling against baselines.

For each category (default: MVTec AD bottle from ``$FLAWMAP_DATA``) and each bank fraction, fits
PatchCore (``coreset_fraction``) and SFR (``bank_fraction``) back to back in this process, then
SFR at the default fraction with ``sampling="random"`` and ``"coreset"`` banks of the same size.
Reports the metrics, the fit time (and its method part, after feature extraction), the predict
time per image of the whole pipeline (decoding, backbone, method, maps; one pass) and of the
method's own scoring alone (on the same embedded test features for every model, all models
interleaved, best of ``--repeats``), and the bank size.

Prints a markdown table and writes the rows as JSON. Timings are wall-clock on whatever else the
machine is doing: compare rows of one run only.

    python benchmarks/bench_sfr.py                              # bottle, fractions 0.01 0.025 0.1
    python benchmarks/bench_sfr.py DATA/screw --fractions 0.025 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from flawmap.cli import format_table
from flawmap.data import Dataset, iter_batches, open_dataset
from flawmap.evaluate import evaluate
from flawmap.models import AnomalyModel, create_model
from flawmap.runtime import Runtime

COLUMNS = [
    "dataset", "method", "sampling", "bank_fraction", "image_auroc", "pixel_auroc", "aupro",
    "fit_s", "fit_method_s", "predict_ms_per_image", "score_ms_per_image", "bank_mb",
]
DEFAULT_FRACTIONS = (0.01, 0.025, 0.1)
BASELINE_SAMPLINGS = ("random", "coreset")
"""SFR bank samplings compared with ``"sparse"`` at the default bank fraction."""


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for folder in args.categories or default_categories():
        dataset = open_dataset(folder)
        rows += benchmark_dataset(dataset, args.fractions, args.sampling_fraction, args.repeats)
    print(f"\nSFR vs PatchCore, torch threads: {args.threads}\n")
    print(format_table(rows, COLUMNS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout folders (default: bottle)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS), help="bank fractions")
    parser.add_argument("--sampling-fraction", type=float, default=0.025, help="bank fraction of the sampling baselines")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the scoring (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--json", type=Path, default=Path("bench_sfr.json"), help="where to write the rows")
    return parser.parse_args()


def default_categories() -> list[Path]:
    """MVTec AD bottle from ``$FLAWMAP_DATA``; exits with a message if the variable is unset."""
    data_root = os.environ.get("FLAWMAP_DATA")
    if not data_root:
        sys.exit("bench_sfr: set FLAWMAP_DATA (the folder holding mvtec_ad/bottle) or name category folders")
    return [Path(data_root) / "mvtec_ad" / "bottle"]


def benchmark_dataset(dataset: Dataset, fractions: list[float], sampling_fraction: float, repeats: int) -> list[dict]:
    """Every configuration on one dataset; one row each."""
    configurations = []
    for fraction in fractions:
        configurations.append(("patchcore", {"coreset_fraction": fraction}, "coreset", fraction))
        configurations.append(("sfr", {"bank_fraction": fraction}, "sparse", fraction))
    for sampling in BASELINE_SAMPLINGS:
        configurations.append(("sfr", {"bank_fraction": sampling_fraction, "sampling": sampling}, sampling, sampling_fraction))
    rows, models = [], []
    for method, params, sampling, fraction in configurations:
        start = time.perf_counter()
        model = create_model(method, runtime=Runtime(progress=True), **params).fit(dataset)
        fit_seconds = time.perf_counter() - start
        rows.append({
            "dataset": dataset.name, "method": method, "sampling": sampling, "bank_fraction": fraction,
            **evaluate(model, dataset),
            "fit_s": fit_seconds, "fit_method_s": model.fit_seconds_["method"],
            "bank_mb": sum(tensor.nbytes for tensor in model.scorer_.search.state().values()) / 2**20,
        })
        models.append(model)
        print(format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
    # The method's own scoring, on the same embedded test features for every model (the embedding
    # is the same function for both methods), interleaved and repeated: the minimum over the
    # repeats is the least disturbed by other work on the machine.
    test_features = embedded_test_batches(models[0], dataset)
    timings = [[score_ms_per_image(model, test_features) for model in models] for _ in range(repeats)]
    for row, model_timings in zip(rows, zip(*timings)):
        row["score_ms_per_image"] = min(model_timings)
    return rows


def embedded_test_batches(model: AnomalyModel, dataset: Dataset) -> list[torch.Tensor]:
    """The test images' patch features (B, C, h, w), batch by batch."""
    runtime = model.runtime
    batches = iter_batches(dataset.test, model.image_size, batch_size=runtime.batch_size, num_workers=runtime.num_workers)
    with torch.inference_mode():
        return [model.scorer_.embed(torch.from_numpy(batch.images).to(runtime.torch_device)) for batch in batches]


def score_ms_per_image(model: AnomalyModel, feature_batches: list[torch.Tensor]) -> float:
    """Milliseconds per image of the method's own scoring (``scorer_.score``) on embedded features."""
    start = time.perf_counter()
    with torch.inference_mode():
        for features in feature_batches:
            model.scorer_.score(features)
    return 1000.0 * (time.perf_counter() - start) / sum(features.shape[0] for features in feature_batches)


if __name__ == "__main__":
    sys.exit(main())
