"""Misalignment study: PaDiM against FYD on a category and on a shifted, rotated copy of it.

The misaligned copy rotates every image (train and test) by a random angle in
[-max_rotation, max_rotation] degrees about its centre and shifts it by a random fraction in
[-max_shift, max_shift] of its side along each axis (one seeded generator, image by image in
sorted order); each ground-truth mask gets its image's transform (nearest neighbour, zero fill),
images are filled with the median colour of their border. It is written (PNG, fast compression) in MVTec layout to a
temporary folder (deleted afterwards; ``--copy-dir`` keeps it and reuses a copy made with the same
settings), never beside the data. Both methods use the same backbone,
taps, image size and ``n_features``; FYD is fitted with its defaults unless flags say otherwise.

Prints a markdown table (dataset variant x method: image AUROC, pixel AUROC, AUPRO, fit minutes)
and writes the rows as JSON. Fit times depend on the machine's load and thread count.

    python benchmarks/bench_fyd.py                                   # bottle, both variants
    python benchmarks/bench_fyd.py DATA/mvtec_ad/screw --epochs 10 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import add_methods_flag, default_category
from flawmap.cli import format_table
from flawmap.data import open_dataset
from flawmap.evaluate import evaluate
from flawmap.models import create_model
from flawmap.runtime import Runtime

COLUMNS = ["dataset", "method", "image_auroc", "pixel_auroc", "aupro", "fit_minutes"]
VARIANTS = ("original", "misaligned")
SHARED_OPTIONS = ("image_size", "n_features")
"""Hyper-parameters given to both methods when set."""
FYD_OPTIONS = ("epochs", "learning_rate", "train_batch_size")
"""Hyper-parameters given to FYD only when set."""


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    shared = {name: getattr(args, name) for name in SHARED_OPTIONS if getattr(args, name) is not None}
    fyd = {name: getattr(args, name) for name in FYD_OPTIONS if getattr(args, name) is not None}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fyd_") as scratch:
        folders = {"original": args.category}
        if "misaligned" in args.variants:
            folders["misaligned"] = misaligned_copy(args.category, args.copy_dir or Path(scratch), args)
        for variant in args.variants:
            dataset = open_dataset(folders[variant])
            for method in args.methods:
                params = {**shared, **(fyd if method == "fyd" else {})}
                rows.append(run(method, params, dataset, variant, args.device))
    print(f"\n{args.category.name}: misaligned = rotation up to {args.max_rotation} deg, shift up to "
          f"{args.max_shift:.0%}, seed {args.seed}; torch threads {args.threads}; shared params {shared}, fyd {fyd}\n")
    print(format_table(rows, COLUMNS))
    record = {"category": str(args.category), "threads": args.threads, "max_rotation": args.max_rotation,
              "max_shift": args.max_shift, "seed": args.seed, "shared_params": shared, "fyd_params": fyd, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    add_methods_flag(parser, "padim,fyd")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--max-rotation", type=float, default=15.0, help="degrees (default 15)")
    parser.add_argument("--max-shift", type=float, default=0.1, help="fraction of the side (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the misalignment (default 0)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--n-features", type=int)
    parser.add_argument("--epochs", type=int, help="FYD only")
    parser.add_argument("--learning-rate", type=float, help="FYD only")
    parser.add_argument("--train-batch-size", type=int, help="FYD only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--copy-dir", type=Path, help="keep the misaligned copy here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=Path("bench_fyd.json"), help="where to write the rows")
    return parser.parse_args()


def misaligned_copy(category: Path, folder: Path, args: argparse.Namespace) -> Path:
    """The misaligned copy of ``category`` in ``folder``: reused when a copy with the same settings
    is there (its ``misalignment.json`` says so), else written."""
    target = folder / category.name
    settings = {"category": str(category.resolve()), "max_rotation": args.max_rotation, "max_shift": args.max_shift,
                "seed": args.seed}
    stamp = target / "misalignment.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == settings:
        print(f"reusing the misaligned copy in {target}")
        return target
    write_misaligned(category, target, args)
    stamp.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    return target


def write_misaligned(category: Path, target: Path, args: argparse.Namespace) -> None:
    """Write the rotated and shifted copy of ``category`` (train, test, ground_truth) to ``target``."""
    generator = np.random.default_rng(args.seed)
    images = sorted(category.glob("train/*/*.png")) + sorted(category.glob("test/*/*.png"))
    for image_path in images:
        angle = float(generator.uniform(-args.max_rotation, args.max_rotation))
        shift = generator.uniform(-args.max_shift, args.max_shift, size=2)
        image = Image.open(image_path).convert("RGB")
        offset = (float(shift[0] * image.width), float(shift[1] * image.height))
        relative = image_path.relative_to(category)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        fill = tuple(int(value) for value in np.median(border_pixels(np.asarray(image)), axis=0))
        image.rotate(angle, Image.BILINEAR, translate=offset, fillcolor=fill).save(target / relative, compress_level=1)
        mask_path = category / "ground_truth" / relative.parent.name / f"{image_path.stem}_mask.png"
        if relative.parts[0] == "test" and mask_path.is_file():
            mask_target = target / mask_path.relative_to(category)
            mask_target.parent.mkdir(parents=True, exist_ok=True)
            mask = Image.open(mask_path).convert("L")
            mask.rotate(angle, Image.NEAREST, translate=offset, fillcolor=0).save(mask_target, compress_level=1)
    print(f"wrote the misaligned copy of {category.name} ({len(images)} images) to {target}")


def border_pixels(pixels: np.ndarray) -> np.ndarray:
    """The outermost pixels of an H x W x 3 image, (2 (H + W) - 4, 3)."""
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def run(method: str, params: dict, dataset, variant: str, device: str) -> dict:
    """Fit ``method`` on ``dataset``'s training images and evaluate it: one row."""
    model = create_model(method, runtime=Runtime(device=device, progress=True), **params)
    start = time.perf_counter()
    model.fit(dataset)
    fit_minutes = (time.perf_counter() - start) / 60.0
    result = evaluate(model, dataset)
    row = {"dataset": variant, "method": method, **result, "fit_minutes": fit_minutes, "fit_seconds": model.fit_seconds_}
    if method == "fyd":
        row["image_alignment_losses"] = model.image_alignment_losses_
        row["feature_alignment_losses"] = model.feature_alignment_losses_
    print(f"{variant} {method}: image AUROC {result['image_auroc']:.4f}, pixel AUROC {result['pixel_auroc']:.4f}, "
          f"fit {fit_minutes:.1f} min")
    return row


if __name__ == "__main__":
    sys.exit(main())
