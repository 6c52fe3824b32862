"""What the real-data benchmark scripts share: the default category and the JSON they write."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: MVTec bottle beside the checkout (``../shared/data``), unless ``FLAWMAP_DATA`` says otherwise.
SHARED_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def default_category() -> Path:
    """``$FLAWMAP_DATA/mvtec_ad/bottle``, else ``../shared/data/mvtec_ad/bottle``."""
    data_root = os.environ.get("FLAWMAP_DATA")
    return Path(data_root) / "mvtec_ad" / "bottle" if data_root else SHARED_BOTTLE


def write_rows(path: Path, category: Path, rows: list[dict]) -> None:
    """Write ``rows`` with the category and the CPU count as JSON, and say where."""
    path.write_text(json.dumps({"category": str(category), "cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {path}")
