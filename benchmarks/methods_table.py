"""Merge ``flawmap benchmark`` JSON files into the one methods table (docs/methods.md).

    python benchmarks/methods_table.py RUN1.json RUN2.json ... --out benchmarks/results/methods.json

Each input is the JSON of one ``flawmap benchmark`` run (several methods may come from separate
runs: a method's rows are re-measured when its code changes). Rows are keyed by dataset and
method; a later file replaces an earlier file's row. Per method a mean row over its datasets is
added (:func:`flawmap.benchmark.mean_row`; fit seconds: the total). Prints the markdown table and
writes the merged rows, with the file each row came from and that run's versions, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flawmap.benchmark import mean_row
from flawmap.cli import format_table

COLUMNS = ["dataset", "method", "image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_ms_per_image", "fit_peak_rss_mb"]
"""Columns of the printed table."""


def merged_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of every file (later files win per dataset x method), each with its ``source``."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        document = json.loads(path.read_text(encoding="utf-8"))
        versions = {key: document[key] for key in ("flawmap_version", "torch_version", "cpu_count")}
        for row in document["rows"]:
            if row["dataset"] != "mean":
                by_key[(row["dataset"], row["method"])] = {**row, "source": path.name, **versions}
    return list(by_key.values())


def with_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by method (first-seen order), each group followed by its mean row."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    table = []
    for method in methods:
        group = [row for row in rows if row["method"] == method]
        table += [*group, mean_row(group, sum(row["fit_s"] for row in group))]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="flawmap benchmark JSON files")
    parser.add_argument("--out", type=Path, required=True, help="merged JSON")
    args = parser.parse_args()
    table = with_means(merged_rows(args.runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": table}, indent=2) + "\n", encoding="utf-8")
    print(format_table(table, COLUMNS))


if __name__ == "__main__":
    main()
