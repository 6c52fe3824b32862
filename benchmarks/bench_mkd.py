"""MKD's maps, scored taps and loss weight on the same cloners: one fit per category and ``lambda``.

For each category and ``direction_weight`` (``lambda``) one MKD model is fitted with the defaults;
then every requested map (``localization``) and number of scored taps is evaluated on the test
split from that same fitted cloner (the image score depends on the scored taps only, the map on
both). By default the categories are bottle, screw and capsules of the shared data
(``$FLAWMAP_DATA`` or ``../shared/data``).

Prints a markdown table (per category and the mean of the categories: image AUROC, pixel AUROC,
AUPRO, predict ms per image) and writes the rows as JSON. Timings depend on the thread count and
on the machine's load. The tables in the module docstring of :mod:`flawmap.models.mkd` come from

    python benchmarks/bench_mkd.py --weights 0.125,0.5,2 --threads 1
    python benchmarks/bench_mkd.py --maps smoothgrad --scored-taps 4 --smoothgrad-samples 50
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from common import default_category, write_rows
from flawmap.cli import format_table
from flawmap.evaluate import evaluate
from flawmap.models import create_model
from flawmap.models.mkd import LOCALIZATIONS, MKD

METRICS = ("image_auroc", "pixel_auroc", "aupro", "predict_ms_per_image")
COLUMNS = ["category", "direction_weight", "localization", "scored_taps", *METRICS, "fit_s"]


def default_categories() -> list[Path]:
    """Bottle, screw and capsules beside bottle in the shared data."""
    data_root = default_category().parents[1]
    return [data_root / "mvtec_ad" / "bottle", data_root / "mvtec_ad" / "screw", data_root / "visa" / "capsules"]


def numbers(kind: type):
    """``"1,2"`` -> ``[kind("1"), kind("2")]``."""
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def variant(model: MKD, localization: str, scored_taps: int) -> MKD:
    """A copy of a fitted model drawing another map with another number of scored taps."""
    other = copy.deepcopy(model)
    other.localization = other.scorer_.localization = localization
    other.scored_taps = other.scorer_.scored_taps = scored_taps
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("categories", nargs="*", type=Path, help="MVTec-layout folders (default: bottle, screw, capsules)")
    parser.add_argument("--weights", type=numbers(float), default=[0.5], help="direction_weight values (default 0.5)")
    parser.add_argument("--maps", type=numbers(str), default=list(LOCALIZATIONS), help="localizations (default all)")
    parser.add_argument("--scored-taps", type=numbers(int), default=[3, 4], help="scored taps (default 3,4)")
    parser.add_argument("--smoothgrad-samples", type=int, default=MKD.smoothgrad_samples)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=Path("bench_mkd.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    categories = args.categories or default_categories()
    rows = []
    for weight in args.weights:
        for category in categories:
            start = time.perf_counter()
            model = create_model("mkd", direction_weight=weight, smoothgrad_samples=args.smoothgrad_samples)
            model.set_runtime(num_workers=1, progress=False).fit(category)
            fit_s = time.perf_counter() - start
            for localization in args.maps:
                for scored_taps in args.scored_taps:
                    result = evaluate(variant(model, localization, scored_taps), category)
                    rows.append({"category": category.name, "direction_weight": weight, "localization": localization,
                                 "scored_taps": scored_taps, "fit_s": fit_s, **{key: result[key] for key in METRICS}})
                    print(rows[-1], flush=True)
    print(format_table(rows + mean_rows(rows), COLUMNS))
    write_rows(args.json, Path(os.path.commonpath(categories)), rows)


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (weight, map, taps): the mean of the metrics over the categories."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["direction_weight"], row["localization"], row["scored_taps"]), []).append(row)
    return [
        {"category": "mean", "direction_weight": weight, "localization": localization, "scored_taps": taps,
         "fit_s": sum(row["fit_s"] for row in group) / len(group),
         **{key: sum(row[key] for row in group) / len(group) for key in METRICS}}
        for (weight, localization, taps), group in groups.items()
    ]


if __name__ == "__main__":
    main()
