"""Finding the samples of a dataset on disk: MVTec-style folders, VisA split files, plain folders.

A :class:`Dataset` only lists files; nothing is decoded here (see :mod:`flawmap.data.loader`).

Layouts understood by :func:`open_dataset`:

- MVTec AD (also MPDD, magnetic tile, BTAD)::

      root/train/good/*            normal training images ("ok" is accepted for "good", as in BTAD)
      root/test/<type>/*           test images; <type> "good" is normal, anything else a defect
      root/ground_truth/<type>/<stem>_mask.<ext>   (or <stem>.<ext>) one mask per defect image

- VisA: ``VisA_root/split_csv/1cls.csv:candle`` names a split file and one object in it.
- A plain folder of images: all are normal training images, with no test set.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flawmap.data.images import IMAGE_SUFFIXES, is_image_file, list_images
from flawmap.errors import FlawmapError

NORMAL = "good"
"""The defect type of normal (defect-free) samples."""

_NORMAL_FOLDERS = ("good", "ok")
"""Folder names holding normal images: MVTec uses ``good``, BTAD uses ``ok``."""

_MVTEC_FOLDERS = ("train", "test", "ground_truth")
"""Any of these subfolders marks a folder as an MVTec-style dataset."""

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
"""Header of VisA's ``split_csv/*.csv`` files."""

_VISA_NORMAL = "normal"
"""VisA's label for normal images."""

_VISA_ANOMALY = "anomaly"
"""VisA's label for anomalous images, also used as their defect type."""

_VISA_MASK_THRESHOLD = 0
"""VisA masks store small label values (1, 2, ...): every nonzero pixel is defective."""


@dataclass(frozen=True)
class Sample:
    """One image: a file, or an image already in memory, with its defect type (``"good"`` when
    normal) and its ground-truth mask, if any.

    ``mask_threshold``: mask pixels with grey level above it are defective. ``pixels`` holds an
    in-memory image (uint8 ``H x W``, ``H x W x 3`` or ``H x W x 4``), decoded instead of the file;
    ``array_index`` is its place in the input it came in (:func:`in_memory`), what names an
    in-memory image without a file.
    """

    image_path: Path | None = None
    defect_type: str = NORMAL
    mask_path: Path | None = None
    mask_threshold: int = 127
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    array_index: int | None = None

    @property
    def is_anomalous(self) -> bool:
        """Whether the sample shows a defect."""
        return self.defect_type != NORMAL

    @property
    def key(self) -> str:
        """``"<defect_type>/<stem>"``: the sample's id in evaluation output."""
        return f"{self.defect_type}/{self.image_path.stem}"

    @property
    def source(self) -> str:
        """Where the image comes from, as messages name it and fits tell images apart: its file's
        path, or ``"array <i>"`` for an in-memory image."""
        return str(self.image_path) if self.image_path is not None else f"array {self.array_index}"


def in_memory(pixels: np.ndarray, index: int) -> Sample:
    """A normal sample for an in-memory image, the ``index``-th of its input."""
    return Sample(pixels=pixels, array_index=index)


@dataclass(frozen=True)
class Dataset:
    """A named dataset: normal training samples and (possibly empty) labelled test samples."""

    name: str
    root: Path
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]


def open_dataset(path: str | Path) -> Dataset:
    """List the samples of the dataset at ``path``, detecting its layout (see module docstring).

    ``path`` is a folder (MVTec-style or plain images) or ``<VisA split csv>:<object>``.

    Raises
    ------
    FlawmapError
        If ``path`` does not exist, matches no layout, or the layout is incomplete (missing
        ``train/good``, a defect image without its mask, ...).
    """
    visa_split = _split_visa_spec(str(path))
    if visa_split is not None:
        return open_visa(*visa_split)
    root = Path(path)
    if not root.exists():
        raise FlawmapError(f"{root}: no such file or folder")
    if root.is_file() and root.suffix.lower() == ".csv":
        raise FlawmapError(f"{root}: name the object to use, as {root}:<object> ({_visa_objects(root)})")
    if root.is_dir() and any((root / folder).is_dir() for folder in _MVTEC_FOLDERS):
        return _open_mvtec(root)
    if root.is_dir() and any(is_image_file(child) for child in root.iterdir()):
        return Dataset(name=root.name, root=root, train=tuple(_normal_samples(root)), test=())
    raise FlawmapError(
        f"{root}: not a dataset folder: expected train/good/ (MVTec layout) or image files"
    )


def open_visa(csv_path: str | Path, object_name: str) -> Dataset:
    """The samples of ``object_name`` in a VisA split file such as ``VisA_root/split_csv/1cls.csv``.

    Paths in the file are relative to the VisA root, the folder holding ``split_csv/``. Normal
    images get defect type ``"good"``, anomalous ones ``"anomaly"``; masks binarise at ``> 0``.

    Raises
    ------
    FlawmapError
        If the file is missing or not a VisA split file, the object is not in it, or a listed
        file is missing.
    """
    csv_path = Path(csv_path)
    rows = [row for row in _read_visa_rows(csv_path) if row["object"] == object_name]
    if not rows:
        raise FlawmapError(f"{csv_path}: no object {object_name!r} ({_visa_objects(csv_path)})")
    visa_root = csv_path.parent.parent
    samples: dict[str, list[Sample]] = {"train": [], "test": []}
    for row in rows:
        if row["split"] not in samples:
            raise FlawmapError(f"{csv_path}: split {row['split']!r} is neither train nor test")
        samples[row["split"]].append(_visa_sample(row, visa_root, csv_path))
    if any(sample.is_anomalous for sample in samples["train"]):
        raise FlawmapError(f"{csv_path}: the train split of {object_name!r} holds anomalous images")
    return Dataset(
        name=object_name, root=visa_root, train=tuple(samples["train"]), test=tuple(samples["test"])
    )


def samples_from_paths(paths: Sequence[str | Path], *, recursive: bool = False) -> list[Sample]:
    """Normal samples for image files and folders given on a command line, in the given order.

    A file gives one sample (whatever its suffix: decoding reports non-images); a folder gives
    one sample per image file directly inside it (or anywhere below it, with ``recursive``), sorted.

    Raises
    ------
    FlawmapError
        If a path does not exist or a folder holds no images.
    """
    samples = []
    for path in map(Path, paths):
        if path.is_dir():
            samples.extend(Sample(image_path=image) for image in list_images(path, recursive=recursive))
        elif path.exists():
            samples.append(Sample(image_path=path))
        else:
            raise FlawmapError(f"{path}: no such file or folder")
    return samples


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output names (no suffix) that keep each input's path relative to the inputs' common
    folder (``broken_large/003``); repeated inputs get ``_2``, ``_3``, ... appended."""
    absolute = [Path(os.path.abspath(path)) for path in paths]
    if not absolute:
        return []
    root = Path(os.path.commonpath([path.parent for path in absolute]))
    names, seen = [], {}
    for path in absolute:
        name = path.relative_to(root).with_suffix("").as_posix()
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def _normal_samples(folder: Path) -> list[Sample]:
    """One normal sample per image file in ``folder``."""
    return [Sample(image_path=path) for path in list_images(folder)]


def _open_mvtec(root: Path) -> Dataset:
    """Read the MVTec-style layout under ``root`` (see module docstring)."""
    train_folder = _normal_folder(root / "train")
    if train_folder is None:
        raise FlawmapError(f"{root}: no train/good/ folder of normal images (MVTec layout)")
    test_folder = root / "test"
    test = []
    if test_folder.is_dir():
        for type_folder in sorted(child for child in test_folder.iterdir() if child.is_dir()):
            test.extend(_test_samples(type_folder, root / "ground_truth" / type_folder.name))
    return Dataset(name=root.name, root=root, train=tuple(_normal_samples(train_folder)), test=tuple(test))


def _normal_folder(split_folder: Path) -> Path | None:
    """The folder of normal images inside ``split_folder`` (``good`` or ``ok``), if present."""
    for name in _NORMAL_FOLDERS:
        if (split_folder / name).is_dir():
            return split_folder / name
    return None


def _test_samples(type_folder: Path, mask_folder: Path) -> list[Sample]:
    """The test samples of one defect type; defect images must each have a mask in ``mask_folder``."""
    if type_folder.name in _NORMAL_FOLDERS:
        return _normal_samples(type_folder)
    masks = _files_by_lower_name(mask_folder)
    samples = []
    for image_path in list_images(type_folder):
        mask_path = _find_mvtec_mask(image_path.stem, masks)
        if mask_path is None:
            expected = mask_folder / f"{image_path.stem}_mask.png"
            raise FlawmapError(f"{image_path}: no ground-truth mask (expected {expected})")
        samples.append(Sample(image_path=image_path, defect_type=type_folder.name, mask_path=mask_path))
    return samples


def _files_by_lower_name(folder: Path) -> dict[str, Path]:
    """The files in ``folder`` keyed by lower-cased name; empty if ``folder`` is missing."""
    if not folder.is_dir():
        return {}
    return {path.name.lower(): path for path in folder.iterdir() if path.is_file()}


def _find_mvtec_mask(stem: str, masks: dict[str, Path]) -> Path | None:
    """``<stem>_mask.<ext>`` (MVTec) if present, else ``<stem>.<ext>`` (BTAD), else None."""
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            mask_path = masks.get(f"{name}{suffix}".lower())
            if mask_path is not None:
                return mask_path
    return None


def _split_visa_spec(spec: str) -> tuple[Path, str] | None:
    """``(csv_path, object)`` if ``spec`` reads ``<file>.csv:<object>``, else None."""
    csv_part, separator, object_name = spec.rpartition(":")
    if separator and object_name and csv_part.lower().endswith(".csv"):
        return Path(csv_part), object_name
    return None


def _read_visa_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a VisA split file, checking its header."""
    if not csv_path.is_file():
        raise FlawmapError(f"{csv_path}: no such file")
    with csv_path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != _VISA_COLUMNS:
            expected = ",".join(_VISA_COLUMNS)
            raise FlawmapError(f"{csv_path}: not a VisA split file (expected header {expected})")
        return list(reader)


def _visa_objects(csv_path: Path) -> str:
    """``"objects: a, b, c"``: the objects named in a VisA split file, for error messages."""
    names = sorted({row["object"] for row in _read_visa_rows(csv_path)})
    return "objects: " + ", ".join(names)


def _visa_sample(row: dict[str, str], visa_root: Path, csv_path: Path) -> Sample:
    """The sample described by one row of a VisA split file; its files must exist."""
    image_path = visa_root / row["image"]
    if not image_path.is_file():
        raise FlawmapError(f"{csv_path}: listed image {image_path} does not exist")
    if row["label"] == _VISA_NORMAL:
        return Sample(image_path=image_path)
    if row["label"] != _VISA_ANOMALY:
        raise FlawmapError(f"{csv_path}: label {row['label']!r} is neither normal nor anomaly")
    if not row["mask"]:
        raise FlawmapError(f"{csv_path}: anomalous image {image_path} has no mask")
    mask_path = visa_root / row["mask"]
    if not mask_path.is_file():
        raise FlawmapError(f"{csv_path}: mask {mask_path} of {image_path} does not exist")
    return Sample(
        image_path=image_path,
        defect_type=_VISA_ANOMALY,
        mask_path=mask_path,
        mask_threshold=_VISA_MASK_THRESHOLD,
    )
