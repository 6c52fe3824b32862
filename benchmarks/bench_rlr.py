"""The identity-shortcut study of RLR: one unified model per attention variant, same data and budget.

For each ``blocks`` variant (``lca+mlka`` = RLR; ``sa`` plain self-attention, ``msa``
self-attention that may not see its own window, ``lca`` local cross attention alone) one RLR
model is trained on the normal images of all given categories together, then evaluated on each
category's test split with no class label. By default the categories are MVTec AD bottle
(``$FLAWMAP_DATA/mvtec_ad/bottle``) and the three demo categories, written to a temporary folder.

Besides image/pixel AUROC and AUPRO, each row has the shortcut ratio: on the defective test
images, the mean reconstruction error inside the defect masks divided by the mean error on their
normal pixels, from the error maps upsampled to the mask resolution WITHOUT smoothing. A model
that copies its input reconstructs defects too, and the ratio falls towards 1.

Prints a markdown table (per category and mean, per variant) with the training time, and writes
the rows as JSON. Timings depend on the thread count and on the machine's load.

    python benchmarks/bench_rlr.py                                  # bottle + demo, four variants
    python benchmarks/bench_rlr.py DATA/cable DATA/screw --epochs 20 --threads 2
    python benchmarks/bench_rlr.py --preset paper --device cuda      # the official capacity
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flawmap.cli import format_table
from flawmap.data import Dataset, make_demo_data, open_dataset
from flawmap.evaluate import evaluate
from flawmap.models import create_model
from flawmap.models.rlr import RLR
from flawmap.runtime import PRECISIONS, Runtime

VARIANTS = ("lca+mlka", "sa", "msa", "lca")
COLUMNS = ["blocks", "category", "image_auroc", "pixel_auroc", "aupro", "shortcut_ratio", "train_minutes"]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "shortcut_ratio")
MODEL_OPTIONS = (
    "epochs", "hidden_dim", "depth", "num_heads", "window_size", "jitter_scale", "image_size", "train_batch_size"
)
"""Hyper-parameters passed on to the model when given; otherwise the preset's or defaults apply."""


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    params = {**RLR.presets.get(args.preset, {}), **{name: getattr(args, name) for name in MODEL_OPTIONS
                                                      if getattr(args, name) is not None}}
    params.pop("blocks", None)  # the variant under study
    with tempfile.TemporaryDirectory(prefix="bench_rlr_") as scratch:
        folders = args.categories or default_categories(Path(scratch))
        datasets = [open_dataset(folder) for folder in folders]
        rows = []
        for blocks in args.blocks:
            rows += run_variant(blocks, datasets, params, args)
            write_record(args, params, rows)
    print(f"\nRLR unified model on {len(datasets)} categories, torch threads: {args.threads}, device: {args.device}, "
          f"precision: {args.precision}, params: {params}\n")
    print(format_table(rows, COLUMNS))
    print(f"\nwrote {args.json}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout folders (default: bottle + demo)")
    parser.add_argument("--blocks", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="the variants to train")
    parser.add_argument("--preset", choices=list(RLR.presets), help="start from this preset (default: RLR's defaults)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, to share the machine)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden-dim", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--num-heads", type=int)
    parser.add_argument("--window-size", type=int)
    parser.add_argument("--jitter-scale", type=float)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-batch-size", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--checkpoint-root", type=Path, help="checkpoint each variant's training under this folder")
    parser.add_argument("--json", type=Path, default=Path("bench_rlr.json"), help="where to write the rows")
    return parser.parse_args()


def default_categories(scratch: Path) -> list[Path]:
    """MVTec AD bottle from $FLAWMAP_DATA plus the three demo categories written to ``scratch``."""
    data_root = os.environ.get("FLAWMAP_DATA")
    if not data_root:
        sys.exit("set FLAWMAP_DATA (the folder holding mvtec_ad/bottle) or name category folders")
    return [Path(data_root) / "mvtec_ad" / "bottle", *make_demo_data(scratch / "demo")]


def run_variant(blocks: str, datasets: list[Dataset], params: dict, args: argparse.Namespace) -> list[dict]:
    """Fit one unified model with these ``blocks``; a row per category plus the mean."""
    checkpoint_dir = str(args.checkpoint_root / blocks) if args.checkpoint_root else None
    runtime = Runtime(device=args.device, precision=args.precision, progress=True)
    model = create_model("rlr", blocks=blocks, checkpoint_dir=checkpoint_dir, runtime=runtime, **params)
    start = time.perf_counter()
    model.fit(datasets)
    train_minutes = (time.perf_counter() - start) / 60.0
    print(f"{blocks}: trained on {model.n_train_images_} images in {train_minutes:.1f} min, "
          f"final loss {model.train_losses_[-1]:.4f}", flush=True)
    rows = []
    for dataset in datasets:
        result = {**evaluate(model, dataset), "shortcut_ratio": shortcut_ratio(model, dataset)}
        rows.append({"blocks": blocks, "category": dataset.name, **result, "train_minutes": train_minutes})
        print(f"  {dataset.name}: image AUROC {result['image_auroc']:.4f}, pixel AUROC {result['pixel_auroc']:.4f}, "
              f"shortcut ratio {result['shortcut_ratio']:.3f}", flush=True)
    mean = {key: float(np.mean([row[key] for row in rows])) for key in METRICS}
    rows.append({"blocks": blocks, "category": "mean", **mean, "train_minutes": train_minutes,
                 "train_losses": model.train_losses_})
    return rows


def shortcut_ratio(model: RLR, dataset: Dataset) -> float:
    """Mean error inside the defect masks / mean error on the other pixels of the defective
    test images, from unsmoothed error maps at the masks' resolution (pooled over the images)."""
    sigma, model.sigma = model.sigma, 0.0  # the raw, upsampled reconstruction errors
    defective = [sample for sample in dataset.test if sample.is_anomalous]
    inside, outside = [], []
    try:
        for prediction, mask in model.iter_predictions(defective, load_masks=True):
            if mask is None:
                continue
            inside.append(prediction.anomaly_map[mask])
            outside.append(prediction.anomaly_map[~mask])
    finally:
        model.sigma = sigma
    return float(np.concatenate(inside).mean() / np.concatenate(outside).mean())


def write_record(args: argparse.Namespace, params: dict, rows: list[dict]) -> None:
    """The rows so far, with the run's settings, as JSON (rewritten after every variant)."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"threads": args.threads, "device": args.device, "precision": args.precision, "preset": args.preset,
              "params": params, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
