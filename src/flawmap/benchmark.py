"""Compare methods across datasets: fit, save and evaluate every dataset x method pair.

With ``unified=True`` each method is also fitted once on the normal images of all datasets
together (one model for many categories, the setting RLR is built for; PatchCore's unified
model is one memory bank over the union) and that model is evaluated on every dataset; the
rows then carry a ``mode`` (``unified`` or ``per-category``) and each mode gets a mean row.

Each pair (and each unified fit) runs in a fresh spawned process, so the peak resident memory it reports
(``ru_maxrss`` of that process) is its own and nothing cached by one run helps the next.
Timings are wall-clock seconds on whatever else the machine is doing: compare rows measured on
one quiet machine only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from flawmap._version import __version__
from flawmap.data import open_dataset
from flawmap.errors import FlawmapError
from flawmap.evaluate import evaluate
from flawmap.models import METHODS, create_model
from flawmap.runtime import Runtime

#: Metrics averaged over the datasets in a mean row (``fit_s`` of a mean row is the total).
MEAN_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "predict_ms_per_image")

#: Columns of the printed table, in order. ``fit_features_s`` (decoding and backbone) and
#: ``fit_method_s`` (the method's own fitting, e.g. PatchCore's coreset) split the fit time before
#: calibration. ``fit_peak_rss_mb`` is the peak memory up to the end of fitting and saving;
#: ``peak_rss_mb`` includes the evaluation, whose pixel metrics at full resolution may dominate it.
TABLE_COLUMNS = (
    "dataset",
    "method",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "fit_s",
    "fit_features_s",
    "fit_method_s",
    "predict_ms_per_image",
    "model_mb",
    "fit_peak_rss_mb",
    "peak_rss_mb",
)


def benchmark(
    data_dirs: Sequence[str | Path],
    methods: Sequence[str],
    *,
    params: dict[str, dict[str, Any]] | None = None,
    json_path: str | Path | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
    unified: bool = False,
) -> list[dict[str, Any]]:
    """Fit and evaluate each method on each dataset, each pair in a fresh process.

    Parameters
    ----------
    data_dirs : sequence of paths
        MVTec-layout dataset folders (with a labelled test split).
    methods : sequence of str
        Registered method names.
    params : dict, optional
        Hyper-parameters per method, ``{"padim": {"n_features": 64}}``.
    json_path : path, optional
        Written after every finished pair as ``{"flawmap_version": ..., "rows": [...]}``.
    progress : bool
        Print one line per finished pair on stderr.
    runtime : Runtime, optional
        How the models run (device, precision, ...); the default runtime if None.
    unified : bool
        Also fit one model per method on all datasets together (see the module docstring).

    Returns
    -------
    list of dict
        One row per dataset x method (datasets outer): the keys of :data:`TABLE_COLUMNS`, the
        other metrics of :func:`flawmap.evaluate.evaluate` and the method's ``params``. With
        ``unified``: per method (methods outer) the unified rows, their mean, the per-category
        rows and their mean, each with its ``mode``.
    """
    params = params or {}
    for method in [*methods, *params]:
        METHODS.get(method)
    if not methods:
        raise FlawmapError("give at least one method to benchmark")
    for data_dir in data_dirs:
        if not open_dataset(data_dir).test:
            raise FlawmapError(f"{data_dir}: no test images to evaluate on (expected test/<type>/ folders)")
    if unified:
        return _unified_rows(data_dirs, methods, params, json_path, progress, runtime or Runtime())
    rows: list[dict[str, Any]] = []
    n_runs = len(data_dirs) * len(methods)
    for data_dir in data_dirs:
        for method in methods:
            row = _in_fresh_process(benchmark_one, str(data_dir), method, params.get(method, {}), runtime or Runtime())
            rows.append(row)
            if progress:
                print(f"[{len(rows)}/{n_runs}] {row['dataset']} {method}: image AUROC {row['image_auroc']:.4f}, "
                      f"pixel AUROC {row['pixel_auroc']:.4f}, fit {row['fit_s']:.1f} s", file=sys.stderr)
            if json_path is not None:
                write_json(rows, json_path)
    return rows


def benchmark_one(data_dir: str, method: str, params: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """Fit, save and evaluate one method on one dataset in this process; one row of results."""
    return benchmark_unified([data_dir], method, params, runtime)[0]


def benchmark_unified(
    data_dirs: Sequence[str], method: str, params: dict[str, Any], runtime: Runtime
) -> list[dict[str, Any]]:
    """Fit one model on all datasets together in this process; a row per dataset (as
    :func:`benchmark_one`, the fit columns being those of the one fit)."""
    datasets = [open_dataset(data_dir) for data_dir in data_dirs]
    start = time.perf_counter()
    model = create_model(method, runtime=runtime, **params).fit(datasets)
    fit_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="flawmap-bench-") as folder:
        model_mb = directory_mb(model.save(Path(folder) / "model"))
    fit_peak_rss_mb = peak_rss_mb()
    fitted = {
        "fit_s": fit_seconds,
        "fit_features_s": model.fit_seconds_["features"],
        "fit_method_s": model.fit_seconds_["method"],
        "model_mb": model_mb,
        "fit_peak_rss_mb": fit_peak_rss_mb,
    }
    rows = []
    for dataset in datasets:
        metrics = evaluate(model, dataset)
        rows.append({"dataset": dataset.name, "method": method, **metrics, **fitted, "peak_rss_mb": peak_rss_mb(),
                     "params": model.get_params()})
    return rows


def mean_row(rows: Sequence[dict[str, Any]], fit_seconds: float) -> dict[str, Any]:
    """The mean of :data:`MEAN_METRICS` over ``rows`` of one method (and mode, where the rows
    have one); ``fit_s`` is ``fit_seconds``, the time of all the fits behind them."""
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in MEAN_METRICS}
    mode = {"mode": rows[0]["mode"]} if "mode" in rows[0] else {}
    return {"dataset": "mean", "method": rows[0]["method"], **mode, **mean, "fit_s": fit_seconds}


def _unified_rows(
    data_dirs: Sequence[str | Path],
    methods: Sequence[str],
    params: dict[str, dict[str, Any]],
    json_path: str | Path | None,
    progress: bool,
    runtime: Runtime,
) -> list[dict[str, Any]]:
    """:func:`benchmark` with ``unified``: per method, the unified fit and the per-category fits."""
    rows: list[dict[str, Any]] = []
    for method in methods:
        method_params = params.get(method, {})
        unified = _in_fresh_process(benchmark_unified, [str(path) for path in data_dirs], method, method_params, runtime)
        per_category = [
            _in_fresh_process(benchmark_one, str(data_dir), method, method_params, runtime) for data_dir in data_dirs
        ]
        fits = {"unified": unified[0]["fit_s"], "per-category": sum(row["fit_s"] for row in per_category)}
        for mode, mode_rows in (("unified", unified), ("per-category", per_category)):
            mode_rows = [{"mode": mode, **row} for row in mode_rows]
            rows += [*mode_rows, mean_row(mode_rows, fits[mode])]
            if progress:
                mean = rows[-1]
                print(f"{method} {mode}: mean image AUROC {mean['image_auroc']:.4f}, pixel AUROC "
                      f"{mean['pixel_auroc']:.4f}, fit {mean['fit_s']:.1f} s", file=sys.stderr)
        if json_path is not None:
            write_json(rows, json_path)
    return rows


def write_json(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` with the software versions to ``path`` as JSON."""
    document = {
        "flawmap_version": __version__,
        "torch_version": torch.__version__,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def directory_mb(directory: Path) -> float:
    """Total size of the files in ``directory`` (recursively), in MiB."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _in_fresh_process(function, *args):
    """``function(*args)`` run in a newly spawned Python process; its result or its exception."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
