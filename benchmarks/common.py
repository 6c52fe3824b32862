"""What the benchmark scripts share: the default category, the --methods list, the JSON they write,
peak-RSS runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

#: MVTec bottle beside the checkout (``../shared/data``), unless ``FLAWMAP_DATA`` says otherwise.
SHARED_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def default_category() -> Path:
    """``$FLAWMAP_DATA/mvtec_ad/bottle``, else ``../shared/data/mvtec_ad/bottle``."""
    data_root = os.environ.get("FLAWMAP_DATA")
    return Path(data_root) / "mvtec_ad" / "bottle" if data_root else SHARED_BOTTLE


def add_methods_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """``--methods A,B``, parsed into a list of method names (``default``: comma-separated)."""
    parser.add_argument("--methods", type=method_names, default=default, help=f"comma-separated (default {default})")


def method_names(text: str) -> list[str]:
    """``"patchcore, padim"`` -> ``["patchcore", "padim"]``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def write_rows(path: Path, category: Path, rows: list[dict]) -> None:
    """Write ``rows`` with the category and the CPU count as JSON, and say where."""
    path.write_text(json.dumps({"category": str(category), "cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {path}")


def run_measured(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` as a child process: its wall seconds and its own peak RSS in MB.

    ``os.wait4`` reports the child's own peak, not the largest of all children so far as
    ``RUSAGE_CHILDREN`` would. A failing child ends the benchmark with its exit status.
    """
    start = time.perf_counter()
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(argv)}")
    return seconds, usage.ru_maxrss / 1024.0  # Linux reports KiB
