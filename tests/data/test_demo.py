"""Tests for flawmap.data.demo: deterministic demo data whose masks are exactly the defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data

from flawmap.data.datasets import open_dataset
from flawmap.data.demo import DEFECT_TYPES, TEXTURES, draw_defect, make_demo_data, normal_image
from flawmap.data.images import read_image, read_mask
from flawmap.errors import FlawmapError

SMALL = {"image_size": 64, "n_train": 3, "n_test_good": 1, "n_test_defect": 2}
"""Arguments for a demo set small enough to write in a fraction of a second."""


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", categories=("brick", "grass"), **SMALL)
    make_demo_data(tmp_path / "b", categories=("brick", "grass"), **SMALL)
    make_demo_data(tmp_path / "c", categories=("brick", "grass"), seed=1, **SMALL)
    first = file_bytes(tmp_path / "a")
    assert len(first) == 2 * (3 + 1 + 2 * 2 * len(DEFECT_TYPES))
    assert first == file_bytes(tmp_path / "b")
    assert first.keys() == file_bytes(tmp_path / "c").keys()
    assert first["brick/train/good/000.png"] != file_bytes(tmp_path / "c")["brick/train/good/000.png"]


def test_category_does_not_depend_on_the_others_requested(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "all", categories=("brick", "grass"), **SMALL)
    make_demo_data(tmp_path / "one", categories=("grass",), **SMALL)
    assert file_bytes(tmp_path / "all" / "grass") == file_bytes(tmp_path / "one" / "grass")


def test_demo_folders_open_as_mvtec_datasets(tmp_path: Path) -> None:
    (folder,) = make_demo_data(tmp_path, categories=("gravel",), **SMALL)
    assert folder == tmp_path / "gravel"
    dataset = open_dataset(folder)
    assert (dataset.name, len(dataset.train), len(dataset.test)) == ("gravel", 3, 1 + 2 * len(DEFECT_TYPES))
    assert {sample.defect_type for sample in dataset.test} == {"good", *DEFECT_TYPES}
    for sample in dataset.test:
        image = read_image(sample.image_path)
        assert image.shape == (64, 64, 3)
        if sample.is_anomalous:
            mask = read_mask(sample.mask_path, image.shape[:2])
            assert 0 < mask.mean() < 0.2


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
@pytest.mark.parametrize("category", list(TEXTURES))
def test_mask_is_exactly_the_changed_pixels(category: str, defect_type: str) -> None:
    load_texture, tint = TEXTURES[category]
    texture = load_texture()
    for seed in range(4):
        rng = np.random.default_rng(seed)
        clean = normal_image(texture, tint, rng, 128)
        image, mask = draw_defect(clean, defect_type, rng)
        changed = np.abs(image.astype(int) - clean).max(axis=2)
        np.testing.assert_array_equal(mask, changed > 0)
        assert 0.001 < mask.mean() < 0.2
        assert changed[mask].mean() >= 10  # visible, comparable to the texture's own variation


def test_normal_images_vary_and_keep_headroom() -> None:
    rng = np.random.default_rng(0)
    first, second = (normal_image(skimage.data.brick(), (1.0, 1.0, 1.0), rng, 64) for _ in range(2))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, second)
    assert first.min() >= 20 and first.max() <= 235
    assert first.std() > 10


def test_refuses_unknown_category_and_non_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FlawmapError, match="unknown demo category 'wood'; choose from: brick, gravel, grass"):
        make_demo_data(tmp_path, categories=("wood",))
    (tmp_path / "brick").mkdir()
    (tmp_path / "brick" / "keep.txt").write_text("mine")
    with pytest.raises(FlawmapError, match="already exists and is not empty"):
        make_demo_data(tmp_path, categories=("brick",), **SMALL)
    assert (tmp_path / "brick" / "keep.txt").read_text() == "mine"
