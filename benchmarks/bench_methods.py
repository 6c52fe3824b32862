"""Benchmark the registered methods on MVTec AD categories with ``flawmap benchmark``.

By default runs every registered method on every category folder under
``$FLAWMAP_DATA/mvtec_ad/``; each dataset x method pair is fitted and evaluated in a fresh
process (see :mod:`flawmap.benchmark`). Prints a markdown table and writes the rows as JSON.

    python benchmarks/bench_methods.py                                  # all of $FLAWMAP_DATA/mvtec_ad/*
    python benchmarks/bench_methods.py DATA/bottle DATA/screw --methods patchcore,padim
    python benchmarks/bench_methods.py DATA/bottle --param patchcore.coreset_fraction=0.01
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flawmap.cli import main as flawmap_main
from flawmap.models import list_methods


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="category folders (default: $FLAWMAP_DATA/mvtec_ad/*)")
    parser.add_argument("--methods", default=",".join(list_methods()), help="comma-separated (default: all registered)")
    parser.add_argument("--json", type=Path, default=Path("bench_methods.json"), help="default ./bench_methods.json")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE")
    args = parser.parse_args()
    categories = args.categories or default_categories()
    options = ["--methods", args.methods, "--json", str(args.json)]
    options += [item for spec in args.param for item in ("--param", spec)]
    status = flawmap_main(["benchmark", *map(str, categories), *options])
    if status == 0:
        print(f"\nwrote {args.json}")
    return status


def default_categories() -> list[Path]:
    """The category folders under ``$FLAWMAP_DATA/mvtec_ad``; exits with a message if there are none."""
    data_root = os.environ.get("FLAWMAP_DATA")
    if not data_root:
        sys.exit("bench_methods: set FLAWMAP_DATA (the folder holding mvtec_ad/) or name category folders")
    categories = sorted(path for path in (Path(data_root) / "mvtec_ad").glob("*") if (path / "train").is_dir())
    if not categories:
        sys.exit(f"bench_methods: no MVTec categories under {Path(data_root) / 'mvtec_ad'}")
    return categories


if __name__ == "__main__":
    sys.exit(main())
