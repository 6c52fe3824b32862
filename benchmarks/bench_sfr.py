"""Benchmark SFR's two claims: robustness to a small bank, and a bank sampling that beats the baselines.

Two studies, on MVTec AD bottle and every demo category (``flawmap.data.demo.TEXTURES``, written
to ``--demo-dir``) unless category folders are named:

- ``bank-size`` (claim A: SFR degrades more slowly than PatchCore as the bank shrinks): PatchCore
  (``coreset_fraction``), SFR (``bank_fraction``, its defaults) and SFR with subspace sampling
  and subspace reconstruction at every ``--fractions``;
- ``sampling`` (claim B: at equal bank size, SFR's bank beats random and coreset banks): SFR with
  each of ``--samplings`` at every ``--sampling-fractions``.

Every configuration is fitted and evaluated end to end in this process. Reports the metrics, the
fit time (and its method part, after feature extraction), the predict time per image of the
whole pipeline (decoding, backbone, method, maps; one pass) and of the method's own scoring alone
(on the same embedded test features for every model, all models interleaved, best of
``--repeats``), and the bank size; then the mean over the categories of each configuration.

Prints markdown tables, writes the rows as JSON and, with ``--plot``, draws pixel AUROC and AUPRO
against the bank fraction. Timings are wall-clock on whatever else the machine is doing: compare
rows of one run only.

    python benchmarks/bench_sfr.py --plot sfr_bank_size.png          # bottle + demo, both studies
    python benchmarks/bench_sfr.py DATA/screw --study sampling --threads 2
    python benchmarks/bench_sfr.py --study bank-size --sfr-param sampling=subspace --sfr-param n_subspaces=32
    python benchmarks/bench_sfr.py --study bank-size --fractions 0.01 --precision float32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import default_category

from flawmap.cli import format_table
from flawmap.data import Dataset, iter_batches, make_demo_data, open_dataset
from flawmap.data.demo import TEXTURES
from flawmap.evaluate import evaluate
from flawmap.models import SFR, AnomalyModel, create_model
from flawmap.runtime import Runtime

COLUMNS = [
    "dataset", "method", "sampling", "bank_fraction", "image_auroc", "pixel_auroc", "aupro",
    "fit_s", "fit_method_s", "predict_ms_per_image", "score_ms_per_image", "bank_mb",
]
MEAN_COLUMNS = ["method", "sampling", "bank_fraction", "n_datasets", "image_auroc", "pixel_auroc", "aupro"]
STUDIES = ("bank-size", "sampling")
DEFAULT_FRACTIONS = (0.005, 0.01, 0.025, 0.1)
DEFAULT_SAMPLING_FRACTIONS = (0.01, 0.025)
DEFAULT_SAMPLINGS = ("sparse", "subspace", "random", "coreset")
#: SFR's explicit-subspace variant, compared in the bank-size study.
SUBSPACE_VARIANT = {"sampling": "subspace", "reconstruction": "subspace"}

#: One configuration: (method, hyper-parameters).
Configuration = tuple[str, dict[str, Any]]


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    configurations = study_configurations(args)
    runtime = Runtime(progress=True, precision=args.precision)
    rows = []
    for folder in args.categories or default_categories(args.demo_dir):
        rows += benchmark_dataset(open_dataset(folder), configurations, args.repeats, runtime)
    print(f"\nSFR vs PatchCore, torch threads: {args.threads}, precision: {args.precision}\n")
    print(format_table(rows, COLUMNS))
    means = mean_rows(rows)
    print("\nMean over the datasets\n")
    print(format_table(means, MEAN_COLUMNS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"threads": args.threads, "precision": args.precision, "sfr_params": args.sfr_param, "rows": rows, "means": means}
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    if args.plot is not None:
        plot_bank_sizes(rows + [{**row, "dataset": "mean"} for row in means], args.plot)
        print(f"wrote {args.plot}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout folders (default: bottle + demo)")
    parser.add_argument("--study", choices=(*STUDIES, "both"), default="both", help="default both")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS), help="bank-size study")
    parser.add_argument("--sampling-fractions", type=float, nargs="+", default=list(DEFAULT_SAMPLING_FRACTIONS),
                        help="bank fractions of the sampling study")
    parser.add_argument("--samplings", nargs="+", default=list(DEFAULT_SAMPLINGS), help="SFR samplings compared")
    parser.add_argument("--sfr-param", action="append", default=[], metavar="NAME=VALUE",
                        help="an SFR hyper-parameter for every SFR configuration (repeatable)")
    parser.add_argument("--demo-dir", type=Path, default=None, help="where to write the demo categories (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the scoring (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="arithmetic precision (float32: as on a CPU without fast bfloat16)")
    parser.add_argument("--json", type=Path, default=Path("bench_sfr.json"), help="where to write the rows")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of pixel AUROC and AUPRO against the bank fraction")
    return parser.parse_args()


def default_categories(demo_dir: Path | None) -> list[Path]:
    """MVTec AD bottle (:func:`common.default_category`) and every demo category, written to
    ``demo_dir`` (or a temporary folder) unless it already holds them."""
    folder = demo_dir or Path(tempfile.mkdtemp(prefix="bench_sfr_demo_"))
    missing = [name for name in TEXTURES if not (folder / name).is_dir()]
    if missing:
        make_demo_data(folder, categories=missing)
    return [default_category(), *(folder / name for name in TEXTURES)]


def study_configurations(args: argparse.Namespace) -> list[Configuration]:
    """The configurations of the chosen studies, each once (SFR's default sampling is in both)."""
    sfr_params = dict(parse_param(text) for text in args.sfr_param)
    configurations: list[Configuration] = []
    if args.study in ("bank-size", "both"):
        for fraction in args.fractions:
            configurations.append(("patchcore", {"coreset_fraction": fraction}))
            configurations.append(("sfr", {**sfr_params, "bank_fraction": fraction}))
            configurations.append(("sfr", {**sfr_params, **SUBSPACE_VARIANT, "bank_fraction": fraction}))
    if args.study in ("sampling", "both"):
        for fraction in args.sampling_fractions:
            for sampling in args.samplings:
                configurations.append(("sfr", {**sfr_params, "bank_fraction": fraction, "sampling": sampling}))
    unique = []
    for method, params in configurations:
        if not any(method == other and same_model(method, params, other_params) for other, other_params in unique):
            unique.append((method, params))
    return unique


def parse_param(text: str) -> tuple[str, Any]:
    """``"n_subspaces=32"`` -> ``("n_subspaces", 32)``; the value is parsed as JSON, else kept as text."""
    name, separator, value = text.partition("=")
    if not separator or not name:
        sys.exit(f"bench_sfr: --sfr-param takes NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def same_model(method: str, params: dict[str, Any], other_params: dict[str, Any]) -> bool:
    """Whether two configurations of ``method`` make the same model (defaults filled in)."""
    return create_model(method, **params).get_params() == create_model(method, **other_params).get_params()


def benchmark_dataset(dataset: Dataset, configurations: list[Configuration], repeats: int, runtime: Runtime) -> list[dict]:
    """Every configuration on one dataset, run with ``runtime``; one row each."""
    rows, models = [], []
    for method, params in configurations:
        start = time.perf_counter()
        model = create_model(method, runtime=runtime, **params).fit(dataset)
        fit_seconds = time.perf_counter() - start
        rows.append({
            "dataset": dataset.name, "method": method, **bank_description(model),
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


def bank_description(model: AnomalyModel) -> dict[str, Any]:
    """The row's ``sampling`` (with SFR's reconstruction when not the default) and ``bank_fraction``."""
    if isinstance(model, SFR):
        sampling = model.sampling if model.reconstruction == "local" else f"{model.sampling}, {model.reconstruction} reconstruction"
        return {"sampling": sampling, "bank_fraction": model.bank_fraction}
    return {"sampling": "coreset", "bank_fraction": model.coreset_fraction}


def mean_rows(rows: list[dict]) -> list[dict]:
    """The mean metrics of each (method, sampling, bank fraction) over the datasets it ran on."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["sampling"], row["bank_fraction"]), []).append(row)
    return [
        {"method": method, "sampling": sampling, "bank_fraction": fraction, "n_datasets": len(group),
         **{key: sum(row[key] for row in group) / len(group) for key in ("image_auroc", "pixel_auroc", "aupro")}}
        for (method, sampling, fraction), group in groups.items()
    ]


def plot_bank_sizes(rows: list[dict], path: Path) -> None:
    """Pixel AUROC and AUPRO against the bank fraction (log scale), one panel per dataset and
    metric, one line per method and sampling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure, axes = plt.subplots(2, len(datasets), figsize=(3.2 * len(datasets), 6), squeeze=False)
    for column, dataset in enumerate(datasets):
        lines: dict[str, list[dict]] = {}
        for row in rows:
            if row["dataset"] == dataset:
                lines.setdefault(f"{row['method']} ({row['sampling']})", []).append(row)
        for metric_row, metric in enumerate(("pixel_auroc", "aupro")):
            axis = axes[metric_row][column]
            for label, points in lines.items():
                points = sorted(points, key=lambda row: row["bank_fraction"])
                if len(points) > 1:
                    axis.plot([p["bank_fraction"] for p in points], [p[metric] for p in points], marker="o", label=label)
            axis.set_xscale("log")
            axis.set_title(f"{dataset}: {metric}", fontsize=9)
            axis.set_xlabel("bank fraction", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
