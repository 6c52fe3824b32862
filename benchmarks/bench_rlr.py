"""Benchmark RLR as a unified multi-class model, with and without the MLKA mask.

One RLR model is trained on the normal images of all given categories together, then evaluated
on each category's test split with no class label. By default the categories are MVTec AD
bottle (``$FLAWMAP_DATA/mvtec_ad/bottle``) and the three demo categories, written to a temporary
folder. The unmasked variant (``mlka_mask=False``) is the identity-shortcut ablation;
``--jitter-scale 0`` also removes the feature-jitter noise, the other guard against copying.

Prints a markdown table (per category and mean, per variant) with the training time, and writes
the rows as JSON. Timings depend on the thread count, which is printed and saved with them.

    python benchmarks/bench_rlr.py                      # bottle + demo, both variants
    python benchmarks/bench_rlr.py DATA/cable DATA/screw --epochs 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from flawmap.cli import format_table
from flawmap.data import make_demo_data, open_dataset
from flawmap.evaluate import evaluate
from flawmap.models import create_model
from flawmap.runtime import PRECISIONS, Runtime

COLUMNS = ["variant", "category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "train_minutes"]
VARIANTS = {"masked": True, "unmasked": False}
"""Variant name -> ``mlka_mask``."""
MODEL_OPTIONS = ("epochs", "hidden_dim", "depth", "jitter_scale", "image_size")
"""Hyper-parameters passed on to the model when given; otherwise its defaults apply."""


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_rlr_") as scratch:
        folders = args.categories or default_categories(Path(scratch))
        datasets = [open_dataset(folder) for folder in folders]
        params = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
        rows = []
        for variant in args.variants:
            rows += run_variant(variant, datasets, params, args)
    print(f"\nRLR unified model on {len(datasets)} categories, torch threads: {args.threads}, device: {args.device}, "
          f"precision: {args.precision}, params: {params}\n")
    print(format_table(rows, COLUMNS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"threads": args.threads, "device": args.device, "precision": args.precision, "params": params, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout folders (default: bottle + demo)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, to share the machine)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden-dim", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--jitter-scale", type=float, help="0 lets the unmasked variant learn the identity shortcut")
    parser.add_argument("--image-size", type=int)
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


def run_variant(variant: str, datasets: list, params: dict, args: argparse.Namespace) -> list[dict]:
    """Fit one unified model for ``variant``; a row per category plus the mean."""
    checkpoint_dir = str(args.checkpoint_root / variant) if args.checkpoint_root else None
    runtime = Runtime(device=args.device, precision=args.precision, progress=True)
    model = create_model("rlr", mlka_mask=VARIANTS[variant], checkpoint_dir=checkpoint_dir, runtime=runtime, **params)
    start = time.perf_counter()
    model.fit(datasets)
    train_minutes = (time.perf_counter() - start) / 60.0
    print(f"{variant}: trained on {model.n_train_images_} images in {train_minutes:.1f} min, "
          f"final loss {model.train_losses_[-1]:.4f}")
    rows = []
    for dataset in datasets:
        result = evaluate(model, dataset)
        rows.append({"variant": variant, "category": dataset.name, **result, "train_minutes": train_minutes})
        print(f"  {dataset.name}: image AUROC {result['image_auroc']:.4f}, pixel AUROC {result['pixel_auroc']:.4f}")
    metrics = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in metrics}
    rows.append({"variant": variant, "category": "mean", **mean, "train_minutes": train_minutes,
                 "train_losses": model.train_losses_})
    return rows


if __name__ == "__main__":
    sys.exit(main())
