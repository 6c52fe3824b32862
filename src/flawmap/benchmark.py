"""Compare methods across datasets: fit, save and evaluate every dataset x method pair.

Each pair runs in a fresh spawned process, so the peak resident memory it reports
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

    Returns
    -------
    list of dict
        One row per dataset x method (datasets outer): the keys of :data:`TABLE_COLUMNS`, the
        other metrics of :func:`flawmap.evaluate.evaluate` and the method's ``params``.
    """
    params = params or {}
    for method in [*methods, *params]:
        METHODS.get(method)
    if not methods:
        raise FlawmapError("give at least one method to benchmark")
    for data_dir in data_dirs:
        if not open_dataset(data_dir).test:
            raise FlawmapError(f"{data_dir}: no test images to evaluate on (expected test/<type>/ folders)")
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
    dataset = open_dataset(data_dir)
    start = time.perf_counter()
    model = create_model(method, runtime=runtime, **params).fit(dataset)
    fit_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="flawmap-bench-") as folder:
        model_mb = directory_mb(model.save(Path(folder) / "model"))
    fit_peak_rss_mb = peak_rss_mb()
    metrics = evaluate(model, dataset)
    return {
        "dataset": dataset.name,
        "method": method,
        **metrics,
        "fit_s": fit_seconds,
        "fit_features_s": model.fit_seconds_["features"],
        "fit_method_s": model.fit_seconds_["method"],
        "model_mb": model_mb,
        "fit_peak_rss_mb": fit_peak_rss_mb,
        "peak_rss_mb": peak_rss_mb(),
        "params": model.get_params(),
    }


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
