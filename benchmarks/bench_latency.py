"""Where predict time goes, per image: each step of the pipeline against the floor, in one run.

For each method (fitted on ``train/good`` of the category, or loaded from ``--models``) and each
batch size (1 and 16), on the same test images (default: the first 32 of the test split):

- ``decode``: ``read_image`` of each file;
- ``resize``: the loader's resize to S x S and batching (``iter_batches`` on the decoded arrays);
- ``backbone``: the backbone pass (``scorer_.levels``);
- ``method``: the rest of the scorer (feature aggregation, search or distances, image scores);
- ``maps``: upsampling and Gaussian smoothing of the patch scores (the model's ``postprocessor()``);
- ``to_original``: resizing each map to its image's original size;
- ``floor`` = decode + backbone: the least any detector must spend;
- ``end_to_end``: ``model.predict`` on the files (decoding threads overlap the network), whose
  ratio to the floor is the figure of merit (issue 14: <= 2x at batch 16, <= 2.5x at batch 1).

Steps run one after another in this process, each repeated ``--repeats`` times (the median is
kept), so on a busy machine compare ratios within one run rather than absolute times.

    python benchmarks/bench_latency.py                                  # bottle, patchcore + padim
    python benchmarks/bench_latency.py --methods patchcore --models DIR  # reuse DIR/<method>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import add_methods_flag, default_category, write_rows
from flawmap import postprocess
from flawmap.cli import format_table
from flawmap.data import iter_batches, open_dataset, read_image
from flawmap.models import create_model, load_model

STEPS = ("decode", "resize", "backbone", "method", "maps", "to_original")
COLUMNS = ["method", "batch", *[f"{step}_ms" for step in STEPS], "floor_ms", "end_to_end_ms", "end_to_end_over_floor"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    add_methods_flag(parser, "patchcore,padim")
    parser.add_argument("--models", type=Path, help="folder of saved models <method>/ (fitted and saved there if missing)")
    parser.add_argument("--n-images", type=int, default=32, help="test images timed (default 32)")
    parser.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step; the median is kept (default 3)")
    parser.add_argument("--json", type=Path, default=Path("bench_latency.json"), help="default ./bench_latency.json")
    args = parser.parse_args()
    paths = [sample.image_path for sample in open_dataset(args.category).test][: args.n_images]
    rows = []
    for method in args.methods:
        model = fitted_model(method, args.category, args.models)
        for batch_size in [int(size) for size in args.batches.split(",")]:
            model.set_runtime(batch_size=batch_size)
            rows.append({"method": method, "batch": batch_size, **breakdown(model, paths, args.repeats)})
            print(format_table(rows[-1:], COLUMNS), file=sys.stderr)
    print(format_table(rows, COLUMNS))
    write_rows(args.json, args.category, rows)
    return 0


def fitted_model(method: str, category: Path, models: Path | None):
    """The method's model: loaded from ``models/<method>`` if there, else fitted (and saved there)."""
    if models is not None and (models / method).is_dir():
        return load_model(models / method)
    print(f"fitting {method} on {category} ...", file=sys.stderr)
    model = create_model(method).fit(category)
    if models is not None:
        model.save(models / method)
    return model


def breakdown(model, paths: list[Path], repeats: int) -> dict[str, float]:
    """Milliseconds per image of each step, the floor and end to end (medians over ``repeats``)."""
    batch_size = model.runtime.batch_size
    decoded = [read_image(path) for path in paths]
    batches = list(iter_batches(decoded, model.image_size, batch_size=batch_size, num_workers=1))
    device = model.runtime.torch_device
    scorer = model.scorer_
    with torch.inference_mode():
        scored = [scorer(torch.from_numpy(batch.images).to(device)) for batch in batches]
        maps = [model.postprocessor()(result.patch_scores)[0] for result in scored]

    def backbone() -> None:
        with torch.inference_mode():
            for batch in batches:
                scorer.levels(torch.from_numpy(batch.images).to(device))

    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                scorer(torch.from_numpy(batch.images).to(device))

    def smoothing() -> None:
        with torch.inference_mode():
            for result in scored:
                model.postprocessor()(result.patch_scores)

    def to_original() -> None:
        for batch_maps, batch in zip(maps, batches):
            for anomaly_map, original_hw in zip(batch_maps.numpy(), batch.original_hw):
                postprocess.to_original_size(anomaly_map, original_hw)

    timings = {
        "decode": lambda: [read_image(path) for path in paths],
        "resize": lambda: list(iter_batches(decoded, model.image_size, batch_size=batch_size, num_workers=1)),
        "backbone": backbone,
        "forward": forward,
        "maps": smoothing,
        "to_original": to_original,
        "end_to_end": lambda: model.predict(paths),
    }
    ms = {name: per_image_ms(step, len(paths), repeats) for name, step in timings.items()}
    ms["method"] = ms.pop("forward") - ms["backbone"]
    row = {f"{step}_ms": ms[step] for step in STEPS}
    row["floor_ms"] = ms["decode"] + ms["backbone"]
    row["end_to_end_ms"] = ms["end_to_end"]
    row["end_to_end_over_floor"] = ms["end_to_end"] / row["floor_ms"]
    return row


def per_image_ms(step, n_images: int, repeats: int) -> float:
    """Median over ``repeats`` runs of ``step()`` (after one warm-up run), in ms per image."""
    step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(seconds) / n_images


if __name__ == "__main__":
    sys.exit(main())
