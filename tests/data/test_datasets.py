"""Tests for flawmap.data.datasets: layout detection, samples, errors, and real MVTec data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawmap.data.datasets import Sample, open_dataset, open_visa, samples_from_paths
from flawmap.data.images import read_image, read_mask
from flawmap.errors import FlawmapError


def touch_image(path: Path) -> Path:
    """Write a tiny grey PNG (or BMP, by suffix) at ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path)
    return path


def make_mvtec(root: Path, normal: str = "good", masks: dict[str, str] | None = None) -> Path:
    """An MVTec-style tree: 3 train, 2 normal test, 2 "crack" and 1 "hole" test images with masks.

    ``masks`` maps defect type to the mask name pattern (``{stem}`` is replaced).
    """
    masks = masks or {"crack": "{stem}_mask.png", "hole": "{stem}.bmp"}
    for stem in ("002", "000", "001"):
        touch_image(root / "train" / normal / f"{stem}.png")
    for stem in ("000", "001"):
        touch_image(root / "test" / normal / f"{stem}.png")
    for defect_type, count in (("crack", 2), ("hole", 1)):
        for index in range(count):
            stem = f"{index:03d}"
            touch_image(root / "test" / defect_type / f"{stem}.png")
            touch_image(root / "ground_truth" / defect_type / masks[defect_type].format(stem=stem))
    return root


def test_sample_key_and_anomaly_flag() -> None:
    normal = Sample(image_path=Path("/d/test/good/007.png"))
    defect = Sample(image_path=Path("/d/test/crack/003.png"), defect_type="crack", mask_path=Path("/m.png"))
    assert (normal.key, normal.is_anomalous, normal.mask_threshold) == ("good/007", False, 127)
    assert (defect.key, defect.is_anomalous) == ("crack/003", True)


def test_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "widget")
    dataset = open_dataset(root)
    assert dataset.name == "widget" and dataset.root == root
    assert [sample.image_path.name for sample in dataset.train] == ["000.png", "001.png", "002.png"]
    assert all(not sample.is_anomalous and sample.mask_path is None for sample in dataset.train)
    assert [sample.key for sample in dataset.test] == ["crack/000", "crack/001", "good/000", "good/001", "hole/000"]
    masks = {sample.key: sample.mask_path for sample in dataset.test}
    assert masks["crack/001"] == root / "ground_truth" / "crack" / "001_mask.png"
    assert masks["hole/000"] == root / "ground_truth" / "hole" / "000.bmp"
    assert masks["good/000"] is None


def test_mvtec_prefers_mask_suffix_name(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "widget", masks={"crack": "{stem}_mask.png", "hole": "{stem}_mask.PNG"})
    touch_image(root / "ground_truth" / "crack" / "000.png")
    masks = {sample.key: sample.mask_path for sample in open_dataset(root).test}
    assert masks["crack/000"].name == "000_mask.png"
    assert masks["hole/000"].name == "000_mask.PNG"


def test_btad_ok_folders_are_normal(tmp_path: Path) -> None:
    dataset = open_dataset(make_mvtec(tmp_path / "01", normal="ok"))
    assert len(dataset.train) == 3
    assert [sample.defect_type for sample in dataset.test].count("good") == 2


def test_mvtec_missing_mask_names_image_and_expected_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "widget")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FlawmapError) as raised:
        open_dataset(root)
    message = str(raised.value)
    assert str(root / "test" / "crack" / "001.png") in message
    assert str(root / "ground_truth" / "crack" / "001_mask.png") in message


def test_mvtec_without_train_good_raises(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "widget")
    (root / "train" / "good").rename(root / "train" / "normal")
    with pytest.raises(FlawmapError, match="no train/good/"):
        open_dataset(root)


def test_mvtec_test_split_is_optional(tmp_path: Path) -> None:
    touch_image(tmp_path / "widget" / "train" / "good" / "000.png")
    dataset = open_dataset(tmp_path / "widget")
    assert len(dataset.train) == 1 and dataset.test == ()


def test_plain_folder_is_all_normal_training(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg"):
        touch_image(tmp_path / "parts" / name)
    dataset = open_dataset(str(tmp_path / "parts"))
    assert dataset.name == "parts" and dataset.test == ()
    assert [sample.key for sample in dataset.train] == ["good/a", "good/b"]


def test_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlawmapError, match="not a dataset folder: expected train/good/"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(FlawmapError, match="no such file or folder"):
        open_dataset(tmp_path / "missing")


def make_visa(root: Path) -> Path:
    """A VisA-style root with a 1cls.csv split for "candle" (2 train, 1 normal + 1 anomalous test) and "pcb1"."""
    rows = [
        "object,split,label,image,mask",
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
    ]
    for row in rows[1:]:
        for relative in row.split(",")[3:]:
            if relative:
                touch_image(root / relative)
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_visa_split_file(tmp_path: Path) -> None:
    csv_path = make_visa(tmp_path / "VisA")
    dataset = open_dataset(f"{csv_path}:candle")
    assert dataset == open_visa(csv_path, "candle")
    assert dataset.name == "candle" and dataset.root == tmp_path / "VisA"
    assert [sample.key for sample in dataset.train] == ["good/0000", "good/0001"]
    assert [sample.key for sample in dataset.test] == ["good/0002", "anomaly/000"]
    anomalous = dataset.test[1]
    assert anomalous.mask_path == tmp_path / "VisA" / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert anomalous.mask_threshold == 0


def test_visa_errors(tmp_path: Path) -> None:
    csv_path = make_visa(tmp_path / "VisA")
    with pytest.raises(FlawmapError, match="no object 'fryum' .objects: candle, pcb1"):
        open_dataset(f"{csv_path}:fryum")
    with pytest.raises(FlawmapError, match="name the object"):
        open_dataset(csv_path)
    (tmp_path / "VisA" / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(FlawmapError, match="000.png of .*000.JPG does not exist"):
        open_dataset(f"{csv_path}:candle")
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(FlawmapError, match="not a VisA split file"):
        open_dataset(f"{other}:candle")


def test_samples_from_paths_keeps_order(tmp_path: Path) -> None:
    single = touch_image(tmp_path / "z.png")
    for name in ("b.png", "a.png"):
        touch_image(tmp_path / "folder" / name)
    samples = samples_from_paths([str(single), tmp_path / "folder"])
    assert [sample.image_path.name for sample in samples] == ["z.png", "a.png", "b.png"]
    assert all(sample.defect_type == "good" for sample in samples)
    with pytest.raises(FlawmapError, match="missing.png: no such file or folder"):
        samples_from_paths([tmp_path / "missing.png"])


def test_real_mvtec_bottle(mvtec_bottle: Path) -> None:
    dataset = open_dataset(mvtec_bottle)
    assert (dataset.name, len(dataset.train), len(dataset.test)) == ("bottle", 209, 83)
    defects = [sample for sample in dataset.test if sample.is_anomalous]
    assert {sample.defect_type for sample in defects} == {"broken_large", "broken_small", "contamination"}
    assert all(sample.mask_path is not None for sample in defects)
    first = defects[0]
    mask = read_mask(first.mask_path, read_image(first.image_path).shape[:2])
    assert mask.shape == (900, 900) and mask.any()
    for sample in defects:
        with Image.open(sample.mask_path) as mask_file:
            assert mask_file.size == (900, 900)
