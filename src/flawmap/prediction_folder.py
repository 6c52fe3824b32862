"""A folder of predictions (``flawmap predict --out DIR``): one overlay PNG per image and ``scores.jsonl``.

:func:`write_predictions` scores image files with any :class:`~flawmap.prediction.Predictor` and
writes, for each, the overlay picture (:func:`flawmap.report.write_overlay`) at the image's path
below the inputs' common folder (``broken_large/003.png``), and one JSON line in ``scores.jsonl``:
``path``, ``score``, ``is_anomalous``, ``threshold``, ``overlay`` (relative to the folder),
``pixel_threshold`` and ``regions`` (:mod:`flawmap.regions`).

The folder follows :mod:`flawmap.outputs`: it is checked before any work, written as a temporary
sibling and swapped in at the end (a failed run leaves the previous folder untouched, a re-run
leaves no stale overlays), and a folder that holds anything but an earlier prediction output is
replaced only with ``force``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flawmap.data import Sample, samples_from_paths
from flawmap.data.datasets import output_names
from flawmap.outputs import check_replaceable, is_listed_output, set_umask_mode
from flawmap.prediction import Prediction, Predictor
from flawmap.report import write_overlay

#: The folder's index: one JSON record per scored image.
SCORES_FILE = "scores.jsonl"


@dataclass(frozen=True)
class PredictionFolder:
    """What :func:`write_predictions` wrote.

    Attributes
    ----------
    out : the folder.
    samples : the images it was given, in order (unreadable ones skipped with ``skip_invalid`` included).
    n_scored, n_anomalous : images scored, and of them flagged anomalous.
    """

    out: Path
    samples: list[Sample]
    n_scored: int
    n_anomalous: int


def write_predictions(
    model: Predictor,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    recursive: bool = False,
    skip_invalid: bool = False,
    force: bool = False,
) -> PredictionFolder:
    """Score image files with ``model`` and write their overlays and ``scores.jsonl`` into ``out``.

    Parameters
    ----------
    model : any fitted Predictor (a torch model or an exported one).
    images : image files and folders of images.
    out : the folder to write; replaced as a whole when the run succeeds.
    recursive : also take the images in subfolders of the folders given.
    skip_invalid : leave out unreadable images with a warning instead of stopping.
    force : replace ``out`` even if it holds files an earlier prediction did not write.

    Raises
    ------
    FlawmapError
        ``out`` cannot be written or holds other files (without ``force``), no images, or an
        unreadable image (without ``skip_invalid``); ``out`` is then left as it was.

    >>> write_predictions(flawmap.load("bottle-model"), ["photos/"], "predictions/")   # doctest: +SKIP
    """
    target = Path(out)
    check_predictions_target(target, force=force)
    samples = samples_from_paths([images] if isinstance(images, (str, Path)) else list(images), recursive=recursive)
    staging = _staging_folder(target)
    try:
        n_scored, n_anomalous = _write_into(model, samples, staging, skip_invalid)
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PredictionFolder(target, samples, n_scored, n_anomalous)


def check_predictions_target(out: Path, *, force: bool = False) -> None:
    """FlawmapError, before any work, unless ``out`` can become a prediction folder: writable, and
    absent, empty or an earlier prediction output (only ``scores.jsonl`` and the overlays it lists),
    or ``force``."""
    check_replaceable(
        out, folder=True, force=force, ours=lambda folder: is_listed_output(folder, SCORES_FILE, "overlay"),
        what=f"an earlier predict output (only {SCORES_FILE} and the overlays it lists)",
    )


def _record(model: Predictor, prediction: Prediction, overlay: str) -> dict:
    """The ``scores.jsonl`` line of one prediction whose overlay is ``overlay``."""
    return {
        "path": prediction.sample.source, "score": prediction.score, "is_anomalous": prediction.is_anomalous,
        "threshold": model.threshold_, "overlay": overlay, "pixel_threshold": prediction.pixel_threshold,
        "regions": [region.to_json() for region in prediction.regions],
    }


def _write_into(model: Predictor, samples: list[Sample], folder: Path, skip_invalid: bool) -> tuple[int, int]:
    """Overlays and ``scores.jsonl`` of ``samples`` into ``folder``; returns (scored, anomalous)."""
    names = output_names([Path(sample.source) for sample in samples])  # in-memory images: "array <i>"
    name_of = {id(sample): name for sample, name in zip(samples, names)}
    n_scored = n_anomalous = 0
    with open(folder / SCORES_FILE, "w", encoding="utf-8") as lines:
        for prediction, _ in model.iter_predictions(samples, skip_invalid=skip_invalid):
            overlay = f"{name_of[id(prediction.sample)]}.png"
            write_overlay(model, prediction, folder / overlay)
            lines.write(json.dumps(_record(model, prediction, overlay)) + "\n")
            n_scored += 1
            n_anomalous += prediction.is_anomalous
    return n_scored, n_anomalous


def _staging_folder(out: Path) -> Path:
    """A new temporary sibling of ``out`` to write into (``out`` is replaced by it at the end)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    set_umask_mode(staging, folder=True)
    return staging


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` in place of ``target`` by renames; the old ``target`` is removed after."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    target.rename(old / target.name)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
