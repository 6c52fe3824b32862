"""Tiling against whole-image resizing on high-resolution scenes with small defects.

Writes an MVTec-layout dataset of demo-texture scenes (default 4000 x 2000 px, the texture at its
native scale, mirrored to fill the scene, one brightness and tint per scene). Each defect test
scene gets one demo defect (:func:`flawmap.data.demo.draw_defect`) drawn into a 192 px square
at a random place (spots 15 to 30 px across, cuts 6 to 10 px and scratches 4 to 7 px wide,
stains 30 to 55 px), with their exact masks. Then, per method, it fits and evaluates

- ``resize``: the whole scene squashed to ``--image-size`` (default 256) px, the usual pipeline;
- ``tiled``: ``--tile-size`` tiles (default 256, overlap ``--tile-overlap`` 32) at native
  resolution, stitched.

It prints a table (image AUROC, pixel AUROC, AUPRO, fit and predict times) and writes JSON.
Timings depend on the machine's load; say what ran beside it.

    python benchmarks/bench_tiling.py                          # 4000 x 2000, padim
    python benchmarks/bench_tiling.py --methods padim,patchcore --param patchcore.coreset_fraction=0.01
    python benchmarks/bench_tiling.py --height 1000 --width 2000 --n-train 4   # a quick look

``--speed`` measures instead how prediction time grows with the number of tiles: square scenes
of 1, 4, 16 and 36 tiles a image, predicted at ``--batch-size`` (default 16), against the
*floor*: decoding the image plus the backbone on each of its tiles (measured on full batches of
tiles), and beside it the model's whole scoring of a tile (backbone, the method's search,
smoothing). ``ratio`` is predict / (decode + tiles x backbone), ``ratio_scoring`` predict /
(decode + tiles x scoring): what cutting, batching and stitching add. Writes
``benchmarks/results/tiling_speed.json``.

    OMP_NUM_THREADS=1 python benchmarks/bench_tiling.py --speed --methods patchcore,padim
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import add_methods_flag, write_rows
from PIL import Image

from flawmap.cli import _method_params, format_table
from flawmap.data.demo import DEFECT_TYPES, TEXTURES, draw_defect
from flawmap.data.images import open_rgb_image
from flawmap.evaluate import evaluate
from flawmap.models import create_model

#: Side of the square a defect is drawn into (demo defects scale with their image).
DEFECT_BOX = 192


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", default="brick", choices=list(TEXTURES), help="demo texture (default brick)")
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--n-train", type=int, default=8, help="good training scenes (default 8)")
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defect", type=int, default=2, help="per defect type (default 2; 4 types)")
    add_methods_flag(parser, "padim")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE", help="a method hyper-parameter")
    parser.add_argument("--image-size", type=int, default=256, help="network input size, both modes (default 256)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="default bench_tiling.json (--speed: benchmarks/results/tiling_speed.json)")
    parser.add_argument("--speed", action="store_true", help="ms per image against tile count, with the floor")
    args = parser.parse_args()
    if args.speed:
        return speed(args)
    args.json = args.json or Path("bench_tiling.json")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tiling-") as scratch:
        start = time.perf_counter()
        dataset = write_scenes(Path(scratch) / args.category, args)
        print(f"wrote {args.height} x {args.width} scenes in {time.perf_counter() - start:.0f} s to {dataset}")
        for method in args.methods:
            for mode, tiling in (("resize", {}), ("tiled", {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap})):
                params = {**_method_params(args.param).get(method, {}), **tiling}
                rows.append(run(method, mode, params, dataset, args))
                print(format_table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["method", "mode", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "fit_s", "predict_s_per_image", "n_train_units"]
    print()
    print(format_table(rows, columns))
    write_rows(args.json, dataset, [{**row, "scene_hw": [args.height, args.width]} for row in rows])
    return 0


def run(method: str, mode: str, params: dict, dataset: Path, args: argparse.Namespace) -> dict:
    """Fit one model on the scenes and evaluate it; one table row."""
    model = create_model(method, image_size=args.image_size, random_state=args.seed, **params)
    model.set_runtime(batch_size=args.batch_size, progress=True)
    start = time.perf_counter()
    model.fit(dataset)
    fit_seconds = time.perf_counter() - start
    result = evaluate(model, dataset)
    return {
        "method": method,
        "mode": mode if mode == "resize" else f"tiled {args.tile_size}/{args.tile_overlap}",
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "pixel_ap": result["pixel_ap"],
        "fit_s": fit_seconds,
        "predict_s_per_image": result["predict_ms_per_image"] / 1000.0,
        "n_train_units": model.n_train_images_,
    }


#: Tiles per side of the scenes of ``--speed`` (1, 4, 16 and 36 tiles an image).
SPEED_GRIDS = (1, 2, 4, 6)
#: Tiles predicted per scene size in ``--speed`` (at least 2 images).
SPEED_TILES = 64


def speed(args: argparse.Namespace) -> int:
    """Prediction time per image against tile count, beside the floor (``--speed``)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    load_texture, tint = TEXTURES[args.category]
    texture = load_texture()
    step = args.tile_size - args.tile_overlap
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tiling-speed-") as scratch:
        train = [scene(texture, tint, rng, (args.tile_size + step, args.tile_size + step)) for _ in range(4)]
        for method in args.methods:
            params = {**_method_params(args.param).get(method, {}), "tile_size": args.tile_size, "tile_overlap": args.tile_overlap}
            model = create_model(method, image_size=args.tile_size, random_state=args.seed, **params)
            model.set_runtime(batch_size=args.batch_size, progress=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 4 training scenes: the calibration warns
                model.fit(train)
            for grid in SPEED_GRIDS:
                side = args.tile_size + step * (grid - 1)
                paths = []
                for index in range(max(2, SPEED_TILES // grid**2)):
                    paths.append(Path(scratch) / f"{side}-{index}.png")
                    save(paths[-1], scene(texture, tint, rng, (side, side)))
                decode_ms = 1000.0 * timed(lambda: [np.asarray(open_rgb_image(path)) for path in paths]) / len(paths)
                model.predict(paths[:1])  # warm-up
                backbone_ms, scoring_ms = per_tile_ms(model, args.batch_size)  # beside each row: the load drifts
                predict_ms = 1000.0 * timed(lambda: model.predict(paths)) / len(paths)
                tiles = grid**2
                rows.append({
                    "method": method, "side_px": side, "tiles": tiles, "images": len(paths),
                    "predict_ms_per_image": predict_ms, "decode_ms": decode_ms, "backbone_ms_per_tile": backbone_ms,
                    "scoring_ms_per_tile": scoring_ms, "floor_ms": decode_ms + tiles * backbone_ms,
                    "ratio": predict_ms / (decode_ms + tiles * backbone_ms),
                    "ratio_scoring": predict_ms / (decode_ms + tiles * scoring_ms),
                })
                print(format_table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["method", "tiles", "predict_ms_per_image", "decode_ms", "backbone_ms_per_tile", "scoring_ms_per_tile", "floor_ms", "ratio", "ratio_scoring"]
    print()
    print(format_table(rows, columns))
    settings = {"batch_size": args.batch_size, "tile_size": args.tile_size, "tile_overlap": args.tile_overlap,
                "torch_threads": torch.get_num_threads(), "precision": model.runtime.precision}
    path = args.json or Path(__file__).parent / "results" / "tiling_speed.json"
    write_rows(path, Path(f"demo texture {args.category}"), [{**row, **settings} for row in rows])
    return 0


def per_tile_ms(model, batch_size: int, repeats: int = 3) -> tuple[float, float]:
    """Milliseconds per tile of the backbone alone and of the model's whole scoring (backbone,
    search, smoothing), on full batches of ``batch_size`` tiles; the best of ``repeats``."""
    tiles = torch.rand(batch_size, 3, model.image_size, model.image_size)
    with torch.inference_mode():
        model.scorer_.levels(tiles)  # warm-up
        backbone = min(timed(lambda: model.scorer_.levels(tiles)) for _ in range(repeats))
    model.score_images(tiles)
    scoring = min(timed(lambda: model.score_images(tiles)) for _ in range(repeats))
    return 1000.0 * backbone / batch_size, 1000.0 * scoring / batch_size


def timed(work) -> float:
    """Seconds ``work()`` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def write_scenes(folder: Path, args: argparse.Namespace) -> Path:
    """An MVTec-layout folder of scenes: train/good, test/good, test/<defect> with masks."""
    rng = np.random.default_rng(args.seed)
    load_texture, tint = TEXTURES[args.category]
    texture = load_texture()
    shape = (args.height, args.width)
    for split, count in (("train", args.n_train), ("test", args.n_test_good)):
        for index in range(count):
            save(folder / split / "good" / f"{index:03d}.png", scene(texture, tint, rng, shape))
    for defect_type in DEFECT_TYPES:
        for index in range(args.n_test_defect):
            image, mask = with_small_defect(scene(texture, tint, rng, shape), defect_type, rng)
            save(folder / "test" / defect_type / f"{index:03d}.png", image)
            save(folder / "ground_truth" / defect_type / f"{index:03d}_mask.png", mask.astype(np.uint8) * 255)
    return folder


def scene(texture: np.ndarray, tint: tuple[float, float, float], rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A ``H x W x 3`` uint8 scene: the grey texture mirrored to fill it at its native scale, from
    a random offset, with one brightness jitter and the category's tint (levels in [20, 235])."""
    height, width = shape
    mirrored = np.pad(texture, ((0, height), (0, width)), mode="symmetric")
    top, left = rng.integers(0, texture.shape[0], 2)
    grey = mirrored[top : top + height, left : left + width].astype(np.float32) / 255.0
    grey = np.clip(grey * rng.uniform(0.92, 1.08), 0.0, 1.0)
    return np.rint(20.0 + 215.0 * grey[:, :, None] * np.asarray(tint, dtype=np.float32)).astype(np.uint8)


def with_small_defect(image: np.ndarray, defect_type: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with one demo defect drawn into a random :data:`DEFECT_BOX` square, and its mask."""
    top = rng.integers(0, image.shape[0] - DEFECT_BOX + 1)
    left = rng.integers(0, image.shape[1] - DEFECT_BOX + 1)
    box = (slice(top, top + DEFECT_BOX), slice(left, left + DEFECT_BOX))
    damaged, drawn = draw_defect(image[box], defect_type, rng)
    image, mask = image.copy(), np.zeros(image.shape[:2], dtype=bool)
    image[box], mask[box] = damaged, drawn
    return image, mask


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


if __name__ == "__main__":
    sys.exit(main())
