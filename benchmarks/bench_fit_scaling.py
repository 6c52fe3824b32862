"""Fit time and peak memory against the number of training images: does fitting stay linear?

Builds a training folder of up to ``max(--sizes)`` images from the category's ``train/good``
(each image under the 8 flips and quarter turns, then a random 85-100 % crop, saved as PNG at
``--side`` pixels), then for each method and size runs ``flawmap fit`` in a child process on the
first ``size`` images and reports its wall seconds, its own peak RSS and the model's own fit
seconds (``fit_seconds_``: features, method, calibration; no interpreter start or model load).
``linearity`` is (seconds at the largest size / seconds at the smallest) divided by the ratio
of the sizes: 1.0 is exactly linear (issue 14: within 1.3 from 250 to 4,000 images, and peak RSS
under 2 GB at 4,000).

    python benchmarks/bench_fit_scaling.py                               # bottle; 250, 1000, 4000
    python benchmarks/bench_fit_scaling.py --methods padim --sizes 100,400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import add_methods_flag, default_category, run_measured, write_rows
from flawmap.cli import format_table
from flawmap.data import open_dataset

COLUMNS = ["method", "n_images", "seconds", "fit_seconds", "features_s", "method_s", "calibration_s", "peak_rss_mb"]
TRANSPOSES = (None, Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM, Image.ROTATE_90, Image.ROTATE_180,
              Image.ROTATE_270, Image.TRANSPOSE, Image.TRANSVERSE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    add_methods_flag(parser, "patchcore,padim,sfr")
    parser.add_argument("--sizes", default="250,1000,4000", help="training-set sizes (default 250,1000,4000)")
    parser.add_argument("--side", type=int, default=320, help="side of the augmented images in pixels (default 320)")
    parser.add_argument("--json", type=Path, default=Path("bench_fit_scaling.json"), help="default ./bench_fit_scaling.json")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="flawmap-fit-scaling-") as folder:
        folder = Path(folder)
        images = augmented_images(args.category, folder / "all", sizes[-1], args.side)
        for method in args.methods:
            for size in sizes:
                rows.append(measure(method, images[:size], folder / f"{method}-{size}"))
                print(format_table(rows[-1:], COLUMNS), file=sys.stderr)
    print(format_table(rows, COLUMNS))
    print("\n" + format_table(linearity(rows), ["method", "sizes", "seconds_linearity", "fit_seconds_linearity", "largest_peak_rss_mb"]))
    write_rows(args.json, args.category, rows)
    return 0


def augmented_images(category: Path, folder: Path, n_images: int, side: int) -> list[Path]:
    """``n_images`` PNG files: the training images cycled through 8 transposes and random crops."""
    print(f"writing {n_images} augmented training images ({side} px) ...", file=sys.stderr)
    folder.mkdir(parents=True)
    sources = [sample.image_path for sample in open_dataset(category).train]
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n_images):
        with Image.open(sources[index % len(sources)]) as image:
            image = image.convert("RGB")
        transpose = TRANSPOSES[index // len(sources) % len(TRANSPOSES)]
        image = image if transpose is None else image.transpose(transpose)
        crop = int(min(image.size) * rng.uniform(0.85, 1.0))
        left, top = (int(rng.integers(0, extent - crop + 1)) for extent in image.size)
        path = folder / f"{index:05d}.png"
        image.crop((left, top, left + crop, top + crop)).resize((side, side), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def measure(method: str, images: list[Path], folder: Path) -> dict:
    """``flawmap fit`` of ``method`` on a folder linking ``images``, in a child process."""
    train = folder / "train"
    train.mkdir(parents=True)
    for path in images:
        os.link(path, train / path.name)
    model_dir = folder / "model"
    seconds, peak_mb = run_measured(
        [sys.executable, "-m", "flawmap.cli", "fit", str(train), "--method", method, "--out", str(model_dir)]
    )
    fit_seconds = json.loads((model_dir / "config.json").read_text())["fitted"]["fit_seconds_"]
    row = {"method": method, "n_images": len(images), "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}
    row |= {f"{step}_s": round(value, 1) for step, value in fit_seconds.items()}
    row["fit_seconds"] = round(sum(fit_seconds.values()), 1)
    return row


def linearity(rows: list[dict]) -> list[dict]:
    """Per method: growth of the time from the smallest to the largest size over the growth of the size."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        runs = [row for row in rows if row["method"] == method]
        smallest, largest = runs[0], runs[-1]
        size_ratio = largest["n_images"] / smallest["n_images"]
        summary.append({
            "method": method,
            "sizes": f"{smallest['n_images']} -> {largest['n_images']}",
            "seconds_linearity": largest["seconds"] / smallest["seconds"] / size_ratio,
            "fit_seconds_linearity": largest["fit_seconds"] / smallest["fit_seconds"] / size_ratio,
            "largest_peak_rss_mb": largest["peak_rss_mb"],
        })
    return summary


if __name__ == "__main__":
    sys.exit(main())
