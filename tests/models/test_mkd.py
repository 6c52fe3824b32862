"""Tests for flawmap.models.mkd: the cloner's taps and shapes, training, both anomaly maps on a
synthetic defect, the grey opening, resuming from a checkpoint, and the export of each mode."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from conftest import assert_same_predictions
from flawmap.data import open_dataset
from flawmap.errors import FlawmapError
from flawmap.export import export_onnx
from flawmap.models import MKD, create_model
from flawmap.models.mkd import Cloner, grey_opening

TINY = {"image_size": 64, "width": 8, "depth": 1, "epochs": 3, "train_batch_size": 4}
DEFECT = (slice(20, 40), slice(24, 44))
"""Rows and columns of the synthetic defect in a 64 x 64 image."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("mkd-checkpoints")


@pytest.fixture(scope="module")
def trained(tiny_dataset, checkpoints) -> MKD:
    """Gradient attribution, trained 3 epochs on the tiny category with a checkpoint."""
    return create_model("mkd", **TINY, checkpoint_dir=str(checkpoints)).set_runtime(batch_size=4, num_workers=1).fit(tiny_dataset)


@pytest.fixture(scope="module")
def clean_and_defect(tiny_dataset) -> list[np.ndarray]:
    """A training image at 64 px and the same image with a blue square painted on it."""
    path = open_dataset(tiny_dataset).train[0].image_path
    clean = np.asarray(Image.open(path).convert("RGB").resize((64, 64)))
    defect = clean.copy()
    defect[DEFECT] = (30, 60, 200)
    return [clean, defect]


def with_localization(model: MKD, localization: str) -> MKD:
    """A copy of a fitted model that draws the other map with the same cloner."""
    other = copy.deepcopy(model)
    other.localization = other.scorer_.localization = localization
    return other


def test_default_taps_and_cloner_shapes_follow_the_source(trained):
    assert trained.taps_ == ("stage2", "stage3", "stage5", "stage7")  # strides 4, 8, 16, 32
    backbone = trained.scorer_.backbone
    cloner = Cloner(backbone.tap_info(trained.taps_), width=4, depth=2)
    images = torch.rand(1, 3, 72, 72)  # not a multiple of 32: the grids round up like the source's
    with torch.no_grad():
        assert [out.shape for out in cloner(images)] == [level.shape for level in backbone.features(images, trained.taps_)]


def test_taps_out_of_stride_order_are_a_clear_error(tiny_dataset):
    with pytest.raises(FlawmapError, match="tap 'stage2' .* cannot follow stride 8"):
        create_model("mkd", **TINY, taps=("stage3", "stage2")).fit(tiny_dataset)
    with pytest.raises(FlawmapError, match="localization must be one of gradient, discrepancy"):
        create_model("mkd", localization="saliency").fit(tiny_dataset)


def test_training_loss_falls(trained):
    losses = trained.train_losses_
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("localization", ["gradient", "discrepancy"])
def test_a_synthetic_defect_scores_higher_and_is_located(trained, clean_and_defect, localization):
    model = with_localization(trained, localization)
    clean, defect = model.predict(clean_and_defect)
    assert defect.score > clean.score
    inside = np.zeros(defect.anomaly_map.shape, dtype=bool)
    inside[DEFECT] = True
    assert defect.anomaly_map[inside].mean() > 1.3 * defect.anomaly_map[~inside].mean()


def test_both_maps_share_the_image_score(trained, clean_and_defect):
    gradient = trained.predict(clean_and_defect)
    discrepancy = with_localization(trained, "discrepancy").predict(clean_and_defect)
    assert [p.score for p in gradient] == pytest.approx([p.score for p in discrepancy], rel=1e-5)


def test_grey_opening_is_scipys_with_the_cross():
    maps = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0))
    cross = ndimage.generate_binary_structure(2, 1)
    expected = ndimage.grey_opening(maps.numpy(), footprint=cross[None], mode="nearest")
    np.testing.assert_allclose(grey_opening(maps).numpy(), expected)


def test_a_fit_resumes_from_its_checkpoint(trained, tiny_dataset, checkpoints, clean_and_defect):
    """Same settings and data: every epoch is read back from the checkpoint, nothing retrained."""
    resumed = create_model("mkd", **TINY, checkpoint_dir=str(checkpoints)).set_runtime(batch_size=4, num_workers=1)
    resumed.fit(tiny_dataset)
    assert resumed.train_losses_ == trained.train_losses_
    assert_same_predictions(trained, resumed, clean_and_defect, rel=1e-6)


def test_only_the_discrepancy_map_exports(trained, tmp_path):
    gradient_dir = trained.save(tmp_path / "gradient")
    with pytest.raises(FlawmapError, match='localization="gradient" cannot be exported to ONNX'):
        export_onnx(gradient_dir, tmp_path / "gradient.onnx")
    assert not (tmp_path / "gradient.onnx").exists()
