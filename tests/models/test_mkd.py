"""Tests for flawmap.models.mkd: the cloner's taps and shapes, training, every anomaly map on a
synthetic defect, guided backpropagation, the scored taps, the grey opening, resuming from a
checkpoint, older directories, and the export of each mode."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from conftest import assert_same_predictions
from flawmap.data import open_dataset
from flawmap.errors import FlawmapError
from flawmap.export import export_onnx
from flawmap.models import MKD, AnomalyModel, create_model
from flawmap.models.mkd import LOCALIZATIONS, Cloner, GuidedRectifiers, grey_opening

TINY = {"image_size": 64, "width": 8, "depth": 1, "epochs": 3, "train_batch_size": 4}
DEFECT = (slice(20, 40), slice(24, 44))
"""Rows and columns of the synthetic defect in a 64 x 64 image."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("mkd-checkpoints")


@pytest.fixture(scope="module")
def trained(tiny_dataset, checkpoints) -> MKD:
    """Default map (discrepancy), trained 3 epochs on the tiny category with a checkpoint."""
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
    """A copy of a fitted model that draws another map with the same cloner (SmoothGrad with 4
    noisy copies, to keep the tests short)."""
    other = copy.deepcopy(model)
    other.localization = other.scorer_.localization = localization
    other.smoothgrad_samples = other.scorer_.smoothgrad_samples = 4
    return other


def defect_contrast(model: MKD, clean_and_defect: list[np.ndarray]) -> float:
    """Mean of the defect image's map inside the defect over its mean outside."""
    anomaly_map = model.predict(clean_and_defect[1:])[0].anomaly_map
    inside = np.zeros(anomaly_map.shape, dtype=bool)
    inside[DEFECT] = True
    return float(anomaly_map[inside].mean() / anomaly_map[~inside].mean())


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
    with pytest.raises(FlawmapError, match="localization must be one of gradient, smoothgrad, guided, discrepancy"):
        create_model("mkd", localization="saliency").fit(tiny_dataset)
    with pytest.raises(FlawmapError, match="scored_taps must be between 1 and the 4 taps, got 5"):
        create_model("mkd", **TINY, scored_taps=5).fit(tiny_dataset)
    with pytest.raises(FlawmapError, match="need smoothgrad_samples >= 1"):
        create_model("mkd", smoothgrad_samples=0).fit(tiny_dataset)


def test_training_loss_falls(trained):
    losses = trained.train_losses_
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("localization", LOCALIZATIONS)
def test_a_synthetic_defect_scores_higher_and_is_located(trained, clean_and_defect, localization):
    model = with_localization(trained, localization)
    clean, defect = model.predict(clean_and_defect)
    assert defect.score > clean.score
    assert defect_contrast(model, clean_and_defect) > 1.3


def test_a_trained_cloner_locates_the_defect_better_than_an_untrained_one(tiny_dataset, clean_and_defect):
    """Training must raise the map inside the defect against the map of the clean image: a
    cloner trained 30 epochs against the initial one (one epoch at a vanishing learning rate). A
    broken training step fails here."""

    def defect_over_clean(learning_rate: float, epochs: int) -> float:
        params = {**TINY, "epochs": epochs, "learning_rate": learning_rate, "localization": "discrepancy"}
        model = create_model("mkd", **params).set_runtime(batch_size=4, num_workers=1).fit(tiny_dataset)
        clean, defect = model.predict(clean_and_defect)
        return float(defect.anomaly_map[DEFECT].mean() / clean.anomaly_map.mean())

    assert defect_over_clean(1e-2, epochs=30) > 1.3 * defect_over_clean(1e-12, epochs=1)


def test_every_map_shares_the_image_score(trained, clean_and_defect):
    """Guided backpropagation and SmoothGrad change the maps only."""
    predictions = {loc: with_localization(trained, loc).predict(clean_and_defect) for loc in LOCALIZATIONS}
    scores = {loc: [p.score for p in predictions[loc]] for loc in LOCALIZATIONS}
    for localization in LOCALIZATIONS[1:]:
        assert scores[localization] == pytest.approx(scores["gradient"], rel=1e-5)
    maps = {loc: predictions[loc][1].anomaly_map for loc in LOCALIZATIONS}
    assert not np.allclose(maps["guided"], maps["gradient"], rtol=1e-2)
    assert not np.allclose(maps["smoothgrad"], maps["gradient"], rtol=1e-2)


def test_guided_rectifiers_pass_positive_gradients_where_the_input_passed():
    inputs = torch.tensor([-1.0, 0.5, 3.0, 7.0, 2.0], requires_grad=True)
    upstream = torch.tensor([1.0, 1.0, -1.0, 1.0, 2.0])
    with GuidedRectifiers():
        relu6, relu = F.relu6(inputs), torch.nn.ReLU(inplace=True)(inputs * 1.0)
    assert torch.equal(relu6, F.relu6(inputs)) and torch.equal(relu, F.relu(inputs))
    (guided6,) = torch.autograd.grad(relu6, inputs, upstream)
    assert guided6.tolist() == [0.0, 1.0, 0.0, 0.0, 2.0]
    (guided,) = torch.autograd.grad(relu, inputs, upstream)
    assert guided.tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]
    (plain,) = torch.autograd.grad(F.relu(inputs), inputs, upstream)  # outside the context: plain
    assert plain.tolist() == [0.0, 1.0, -1.0, 1.0, 2.0]


def test_the_score_sums_the_loss_of_the_scored_taps(trained, clean_and_defect):
    """Three scored taps (the authors') leave out the finest tap's positive loss; its map is on
    the stride-8 grid."""
    three_taps = copy.deepcopy(trained)
    three_taps.scored_taps = three_taps.scorer_.scored_taps = 3
    three, four = three_taps.predict(clean_and_defect), trained.predict(clean_and_defect)
    assert all(0 < p3.score < p4.score for p3, p4 in zip(three, four))
    assert three_taps.scorer_(torch.rand(1, 3, 64, 64)).patch_scores.shape == (1, 8, 8)


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


def test_older_directories_load_as_they_were_fitted(trained, tmp_path, clean_and_defect):
    """An MKD saved before ``scored_taps`` existed (format 6) scored all four taps with the
    gradient map it names, and still does."""
    gradient = with_localization(trained, "gradient")
    target = gradient.save(tmp_path / "mkd")
    config = json.loads((target / "config.json").read_text())
    del config["params"]["scored_taps"], config["params"]["smoothgrad_samples"]
    config["format_version"] = 6
    (target / "config.json").write_text(json.dumps(config))
    loaded = AnomalyModel.load(target)
    assert (loaded.localization, loaded.scored_taps) == ("gradient", 4)
    assert_same_predictions(gradient, loaded, clean_and_defect, rel=1e-6)


@pytest.mark.parametrize("localization", ["gradient", "smoothgrad", "guided"])
def test_only_the_discrepancy_map_exports(trained, tmp_path, localization):
    attribution_dir = with_localization(trained, localization).save(tmp_path / localization)
    with pytest.raises(FlawmapError, match=f'localization="{localization}" cannot be exported to ONNX'):
        export_onnx(attribution_dir, tmp_path / "attribution.onnx")
    assert not (tmp_path / "attribution.onnx").exists()
