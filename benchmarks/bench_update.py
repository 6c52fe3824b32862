"""Incremental fit against one fit: accuracy and time of ``flawmap fit --update`` on real data.

For each method: (a) one ``flawmap fit`` on all of ``train/good``; (b) ``flawmap fit`` on the first
half, then ``flawmap fit --update`` with the second half. Both models are evaluated on the test
split. The halves are folders of links to the real files, so both procedures hold out the same
calibration images. Prints a markdown table and writes JSON; measure on a quiet machine.

    python benchmarks/bench_update.py                       # ../shared/data/mvtec_ad/bottle
    python benchmarks/bench_update.py DATA/screw --methods patchcore,padim,spade,sfr
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import add_methods_flag, default_category, write_rows
from flawmap.cli import format_table
from flawmap.cli import main as flawmap_main
from flawmap.data import open_dataset
from flawmap.evaluate import evaluate
from flawmap.models import load_model

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    add_methods_flag(parser, "patchcore,padim")
    parser.add_argument("--json", type=Path, default=Path("bench_update.json"), help="default ./bench_update.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flawmap-update-") as folder:
        halves = split_train(args.category, Path(folder))
        for method in args.methods:
            rows += compare(method, args.category, halves, Path(folder) / method)
            print(format_table(rows[-2:], ["method", "procedure", *METRICS, "fit_s", "update_s"]), file=sys.stderr)
    print(format_table(rows, ["method", "procedure", *METRICS, "max_abs_difference", "fit_s", "update_s", "n_train_images"]))
    write_rows(args.json, args.category, rows)
    return 0


def split_train(category: Path, folder: Path) -> tuple[Path, Path]:
    """Two folders linking the first and the second half of ``train/good``."""
    train = [sample.image_path for sample in open_dataset(category).train]
    half = len(train) // 2
    halves = folder / "first_half", folder / "second_half"
    for target, paths in zip(halves, (train[:half], train[half:])):
        target.mkdir()
        for path in paths:
            (target / path.name).symlink_to(path.resolve())
    return halves


def compare(method: str, category: Path, halves: tuple[Path, Path], folder: Path) -> list[dict]:
    one_fit_s = run("fit", category, "--method", method, "--out", folder / "one_fit")
    first_half_s = run("fit", halves[0], "--method", method, "--out", folder / "updated")
    update_s = run("fit", halves[1], "--update", folder / "updated")
    results = {name: evaluate(load_model(folder / name), category) for name in ("one_fit", "updated")}
    difference = max(abs(results["one_fit"][key] - results["updated"][key]) for key in METRICS)
    return [
        {"method": method, "procedure": "one fit on all", **pick(results["one_fit"]), "fit_s": one_fit_s, "update_s": None,
         "n_train_images": load_model(folder / "one_fit").n_train_images_},
        {"method": method, "procedure": "half, then --update", **pick(results["updated"]), "max_abs_difference": difference,
         "fit_s": first_half_s, "update_s": update_s, "n_train_images": load_model(folder / "updated").n_train_images_},
    ]


def run(*argv: object) -> float:
    """Wall seconds of one ``flawmap`` command run in this process (model load and save included)."""
    start = time.perf_counter()
    status = flawmap_main([str(arg) for arg in argv])
    if status != 0:
        sys.exit(f"bench_update: flawmap {' '.join(map(str, argv))} failed")
    return time.perf_counter() - start


def pick(result: dict) -> dict:
    return {key: result[key] for key in METRICS}


if __name__ == "__main__":
    sys.exit(main())
