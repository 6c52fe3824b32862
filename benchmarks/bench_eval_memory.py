"""Evaluation in bounded memory: peak RSS of ``flawmap evaluate``, and its metrics against exact ones.

Every ``flawmap evaluate`` runs in a child process whose own peak RSS is measured.

1. MVTec bottle, PatchCore at its defaults (256 px, 10% coreset): peak RSS (target < 1,000 MB),
   and the pixel metrics against the exact global sort (``flawmap.metrics.pixel_metrics``, also
   a child process, its peak RSS reported too) of the maps the same run wrote with --maps-dir
   (target: every metric within 1e-4).
2. Synthetic: ``--n-images`` test images (default 3,000) of 1500 x 1000 pixels, every other one
   with a defect and its mask, in MVTec layout in a temporary folder, scored by a real PatchCore
   fitted at 64 px on 12 synthetic good images: peak RSS (target < 1.5 GB). Then the first
   ``--n-exact`` of them (default 40) again with --maps-dir, against the exact metrics.
   The test images are hard links to 24 distinct defect-free and 24 defective JPEG files (and
   their PNG masks), so the folder takes little disk and time to write; every image is still
   decoded, scored and counted.

    python benchmarks/bench_eval_memory.py
    python benchmarks/bench_eval_memory.py --n-images 300 --skip-bottle
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common import default_category, run_measured, write_rows

PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max")
COLUMNS = ["run", "n_images", "peak_rss_mb", "seconds", *PIXEL_METRICS, "exact_peak_rss_mb", "max_abs_difference"]
N_DISTINCT = 24


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    parser.add_argument("--bottle-model", type=Path, help="a saved PatchCore model of the category (default: fit one)")
    parser.add_argument("--n-images", type=int, default=3000, help="synthetic test images (default 3000)")
    parser.add_argument("--size", type=int, nargs=2, default=(1500, 1000), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--n-exact", type=int, default=40, help="synthetic images checked against exact metrics")
    parser.add_argument("--skip-bottle", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench_eval_memory.json"), help="default ./bench_eval_memory.json")
    parser.add_argument("--exact", nargs=3, type=Path, metavar=("MAPS_DIR", "DATA_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exact:
        write_exact_metrics(*args.exact)
        return 0
    from flawmap.cli import format_table

    rows = []
    with tempfile.TemporaryDirectory(prefix="flawmap-eval-memory-") as folder:
        folder = Path(folder)
        if not args.skip_bottle:
            model = args.bottle_model or fit_model(args.category, folder / "bottle-model", {})
            rows.append(measure("bottle", model, args.category, folder / "bottle", with_exact=True))
            print(format_table(rows, COLUMNS), file=sys.stderr)
        if not args.skip_synthetic:
            data = make_synthetic(folder / "synthetic", args.n_images, tuple(args.size))
            model = fit_model(data, folder / "synthetic-model", {"image_size": 64, "coreset_fraction": 0.25})
            rows.append(measure(f"synthetic {args.size[0]}x{args.size[1]}", model, data, folder / "full", with_exact=False))
            subset = make_subset(data, folder / "subset", args.n_exact)
            rows.append(measure(f"synthetic first {args.n_exact}", model, subset, folder / "subset-run", with_exact=True))
    print(format_table(rows, COLUMNS))
    write_rows(args.json, args.category, rows)
    return 0


def fit_model(data: Path, out: Path, params: dict) -> Path:
    """Fit a PatchCore (its defaults updated by ``params``) on ``data`` and save it to ``out``."""
    from flawmap.models import PatchCore

    print(f"fitting PatchCore {params or '(defaults)'} on {data} ...", file=sys.stderr)
    return PatchCore(**params).fit(data).save(out)


def measure(run: str, model: Path, data: Path, folder: Path, with_exact: bool) -> dict:
    """``flawmap evaluate`` in a child: seconds, peak RSS, metrics; with the exact ones if asked."""
    folder.mkdir(parents=True)
    metrics_path, maps_dir = folder / "metrics.json", folder / "maps"
    argv = [sys.executable, "-m", "flawmap.cli", "evaluate", str(model), str(data), "--json", str(metrics_path)]
    argv += ["--maps-dir", str(maps_dir)] if with_exact else []
    print(f"{run}: flawmap evaluate ...", file=sys.stderr)
    seconds, peak_mb = run_measured(argv)
    metrics = json.loads(metrics_path.read_text())
    row = {"run": run, "n_images": metrics["n_images"], "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1)}
    row |= {name: metrics[name] for name in PIXEL_METRICS}
    if with_exact:
        exact_path = folder / "exact.json"
        _, exact_peak_mb = run_measured([sys.executable, __file__, "--exact", str(maps_dir), str(data), str(exact_path)])
        exact = json.loads(exact_path.read_text())
        row["exact"] = exact
        row["exact_peak_rss_mb"] = round(exact_peak_mb)
        row["max_abs_difference"] = f"{max(abs(metrics[name] - exact[name]) for name in PIXEL_METRICS):.1e}"
    return row


def write_exact_metrics(maps_dir: Path, data: Path, out: Path) -> None:
    """The exact pixel metrics (one global sort) of the maps in ``maps_dir``, as JSON in ``out``."""
    from flawmap.data import open_dataset, read_mask
    from flawmap.metrics import pixel_metrics

    maps, masks = [], []
    for sample in open_dataset(data).test:
        anomaly_map = np.load(maps_dir / f"{sample.key}.npy")
        maps.append(anomaly_map)
        masks.append(read_mask(sample.mask_path, anomaly_map.shape) if sample.mask_path else np.zeros(anomaly_map.shape, bool))
    out.write_text(json.dumps(pixel_metrics(maps, masks)))


def make_synthetic(root: Path, n_images: int, size_wh: tuple[int, int]) -> Path:
    """An MVTec-layout category: 12 train images; ``n_images`` test images, odd ones defective."""
    rng = np.random.default_rng(0)
    print(f"writing {n_images} synthetic {size_wh[0]}x{size_wh[1]} test images under {root} ...", file=sys.stderr)
    folders = {name: root / name for name in ("train/good", "test/good", "test/defect", "ground_truth/defect", "bases")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for index in range(12):
        texture(rng, size_wh).save(folders["train/good"] / f"{index:03d}.jpg", quality=90)
    for index in range(N_DISTINCT):
        texture(rng, size_wh).save(folders["bases"] / f"good_{index}.jpg", quality=90)
        image, mask = with_defect(rng, texture(rng, size_wh))
        image.save(folders["bases"] / f"defect_{index}.jpg", quality=90)
        mask.save(folders["bases"] / f"defect_{index}_mask.png")
    for index in range(n_images):
        base = index // 2 % N_DISTINCT
        if index % 2 == 0:
            os.link(folders["bases"] / f"good_{base}.jpg", folders["test/good"] / f"{index:05d}.jpg")
        else:
            os.link(folders["bases"] / f"defect_{base}.jpg", folders["test/defect"] / f"{index:05d}.jpg")
            os.link(folders["bases"] / f"defect_{base}_mask.png", folders["ground_truth/defect"] / f"{index:05d}_mask.png")
    return root


def make_subset(data: Path, root: Path, n_images: int) -> Path:
    """The first ``n_images`` test images of ``data`` (and all its train images), linked."""
    for path in sorted(data.glob("*/*/*")):
        relative = path.relative_to(data)
        if relative.parts[0] != "bases" and (relative.parts[0] == "train" or int(path.stem[:5]) < n_images):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, root / relative)
    return root


def texture(rng: np.random.Generator, size_wh: tuple[int, int]) -> Image.Image:
    """A smooth random colour field with fine grain, ``size_wh`` pixels."""
    width, height = size_wh
    coarse = rng.integers(60, 200, size=(height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize(size_wh, Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def with_defect(rng: np.random.Generator, image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """``image`` with one to three dark blotches, and their mask (``L``, 255 = defect)."""
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    width, height = image.size
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.integers(0, width - 200), rng.integers(0, height - 200)
        draw.ellipse([x, y, x + rng.integers(20, 200), y + rng.integers(20, 200)], fill=255)
    dark = Image.eval(image, lambda value: value // 3)
    softened = mask.filter(ImageFilter.GaussianBlur(2))
    return Image.composite(dark, image, softened), mask


if __name__ == "__main__":
    sys.exit(main())
