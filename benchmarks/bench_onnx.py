"""torch against onnxruntime: predict time per image at batch 1 and 16, model file size, metrics.

For each method: fit on ``train/good`` (or reuse ``--models DIR/<method>`` if it holds a model),
export it (``flawmap export``; a dynamic batch, or one graph per batch size for methods that need
a fixed one), then on the test split:

- ``model_ms_b1``, ``model_ms_b16``: the model alone (``score_images`` on decoded batches: network,
  search and smoothing) per image, the fastest of ``--repeats`` passes, the backends taking turns
  (the least disturbed by whatever else runs), at batch 1 and 16;
- ``predict_ms_per_image``: ``evaluate``'s end-to-end time (decoding, model, resize to the
  original size), and the metrics, at batch 16.

Rows: ``torch auto`` and ``torch float32`` (the model directory), ``onnxruntime`` (the .onnx
file). On a CPU without native bfloat16, ``auto`` is float32. Measure on a quiet machine.

    python benchmarks/bench_onnx.py                                  # ../shared/data/mvtec_ad/bottle, patchcore
    python benchmarks/bench_onnx.py DATA/bottle --methods patchcore,padim,sfr --models models/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flawmap
from common import add_methods_flag, default_category, write_rows
from flawmap.cli import format_table
from flawmap.data import iter_batches, open_dataset
from flawmap.evaluate import evaluate
from flawmap.export import export_onnx
from flawmap.io import CONFIG_FILE
from flawmap.prediction import Predictor

BATCH_SIZES = (1, 16)
METRICS = ("image_auroc", "pixel_auroc", "aupro")
#: Test images timed by the model-only measurement (decoded once, beforehand).
TIMED_IMAGES = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    add_methods_flag(parser, "patchcore")
    parser.add_argument("--models", type=Path, default=Path("bench_onnx_models"), help="model folders (default ./bench_onnx_models)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of the model-only measurement (default 5)")
    parser.add_argument("--json", type=Path, default=Path("bench_onnx.json"), help="default ./bench_onnx.json")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        rows += compare(method, args.category, args.models / method, args.repeats)
        print(format_table(rows[-3:], list(rows[-1])), file=sys.stderr)
    columns = ["method", "backend", "model_ms_b1", "model_ms_b16", "predict_ms_per_image", "file_mb", *METRICS]
    print(format_table(rows, columns))
    write_rows(args.json, args.category, rows)
    return 0


def compare(method: str, category: Path, folder: Path, repeats: int) -> list[dict]:
    """Rows for torch auto, torch float32 and onnxruntime of one method."""
    dataset = open_dataset(category)
    model_dir = folder / "model"
    if not (model_dir / CONFIG_FILE).is_file():
        flawmap.create_model(method).set_runtime(progress=True).fit(dataset).save(model_dir)
    onnx_files = export_all(model_dir, folder)
    openers = {
        "torch auto": lambda batch: flawmap.load(model_dir, precision="auto", batch_size=batch),
        "torch float32": lambda batch: flawmap.load(model_dir, precision="float32", batch_size=batch),
        "onnxruntime": lambda batch: flawmap.load(onnx_files[batch], batch_size=batch),
    }
    rows = {name: {"method": method, "backend": name} for name in openers}  # backend and its precision
    timed = list(dataset.test)[:TIMED_IMAGES]
    for batch in BATCH_SIZES:
        models = {name: open_model(batch) for name, open_model in openers.items()}
        for name, milliseconds in model_ms_per_image(models, timed, batch, repeats).items():
            rows[name][f"model_ms_b{batch}"] = milliseconds
    for name, open_model in openers.items():
        result = evaluate(open_model(16), dataset)
        rows[name]["predict_ms_per_image"] = result["predict_ms_per_image"]
        rows[name].update({key: result[key] for key in METRICS})
        rows[name]["file_mb"] = megabytes(onnx_files[16] if name == "onnxruntime" else model_dir)
    return list(rows.values())


def export_all(model_dir: Path, folder: Path) -> dict[int, Path]:
    """batch size -> .onnx file: one dynamic graph, or one fixed graph per batch size if needed."""
    dynamic = folder / "model.onnx"
    if not dynamic.is_file():
        try:
            export_onnx(model_dir, dynamic)
        except flawmap.FlawmapError as error:
            print(f"bench_onnx: {error}; exporting one graph per batch size", file=sys.stderr)
            return {batch: export_fixed(model_dir, folder, batch) for batch in BATCH_SIZES}
    return dict.fromkeys(BATCH_SIZES, dynamic)


def export_fixed(model_dir: Path, folder: Path, batch: int) -> Path:
    target = folder / f"model-b{batch}.onnx"
    return target if target.is_file() else export_onnx(model_dir, target, batch=batch)


def model_ms_per_image(models: dict[str, Predictor], samples: list, batch: int, repeats: int) -> dict[str, float]:
    """Per model, the fastest of ``repeats`` passes of ``score_images`` over pre-decoded batches,
    per image. The models take turns in every repeat, so a busy spell slows all of them."""
    image_size = next(iter(models.values())).image_size
    batches = [item.images for item in iter_batches(samples, image_size, batch_size=batch)]
    for model in models.values():
        model.score_images(batches[0])  # warm-up: first-call allocations and graph initialisation
    passes: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            for images in batches:
                model.score_images(images)
            passes[name].append(time.perf_counter() - start)
    return {name: 1000.0 * min(seconds) / len(samples) for name, seconds in passes.items()}


def megabytes(path: Path) -> float:
    files = [path] if path.is_file() else [item for item in path.iterdir() if item.is_file()]
    return sum(item.stat().st_size for item in files) / 2**20


if __name__ == "__main__":
    sys.exit(main())
