"""Tests for flawmap.models.deepsvdd: the collapse guard (bias-free networks), the centre and its
eps guard, the one-class objective, both encoders, the map on a synthetic defect, and ``partial_fit``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from flawmap.backbones import create_backbone
from flawmap.data import open_dataset
from flawmap.errors import FlawmapError
from flawmap.models import DeepSVDD, create_model
from flawmap.models.deepsvdd import CENTER_EPS, DeepSVDDScorer, check_bias_free

TINY = {"image_size": 64, "epochs": 5, "hidden_dim": 32, "rep_dim": 16, "train_batch_size": 4, "learning_rate": 1e-3}
DEFECT = (slice(20, 40), slice(24, 44))
"""Rows and columns of the synthetic defect in a 64 x 64 image."""


@pytest.fixture(scope="module")
def trained(tiny_dataset) -> DeepSVDD:
    return create_model("deepsvdd", **TINY).set_runtime(batch_size=4, num_workers=1, precision="float32").fit(tiny_dataset)


def new_scorer(init: str) -> DeepSVDDScorer:
    backbone = create_backbone("efficientnet_lite0")
    return DeepSVDDScorer(backbone, backbone.default_taps, init=init, hidden_dim=8, rep_dim=4)


@pytest.mark.parametrize(
    "network",
    [nn.Conv2d(3, 4, 1), nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)), nn.Linear(3, 4)],
    ids=["conv-bias", "affine-batch-norm", "linear-bias"],
)
def test_a_network_with_a_bias_is_refused(network):
    """The collapse guard: with a bias the network could output c for every input."""
    with pytest.raises(FlawmapError, match="bias-free"):
        check_bias_free(network)


@pytest.mark.parametrize("init", ["pretrained", "scratch"])
def test_both_encoders_are_bias_free(init):
    encoder = new_scorer(init).encoder
    check_bias_free(encoder)
    assert not [name for name, _ in encoder.named_parameters() if name.endswith("bias")]


def test_a_biased_network_collapses_where_the_bias_free_one_cannot():
    """Why the guard exists: with a bias, zero weights reach the objective's minimum (0) for any
    input; without one, zero weights give ||0 - c||^2 >= rep_dim eps^2 > 0."""
    center = torch.full((4,), 0.5)
    biased = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.copy_(center)
    inputs = torch.randn(5, 3, 6, 6)
    assert (biased(inputs) - center.view(1, -1, 1, 1)).pow(2).sum(dim=1).max() == 0.0
    bias_free = nn.Conv2d(3, 4, 1, bias=False)
    with torch.no_grad():
        bias_free.weight.zero_()
    assert (bias_free(inputs) - center.view(1, -1, 1, 1)).pow(2).sum(dim=1).min() >= 4 * CENTER_EPS**2


def test_the_center_is_the_mean_embedding_with_small_coordinates_pushed_to_eps():
    scorer = new_scorer("scratch")
    inputs = torch.rand(6, 3, 32, 32)
    scorer.set_center(inputs)
    with torch.no_grad():
        mean = scorer.embeddings(inputs).mean(dim=(0, 2, 3))
    far = mean.abs() >= CENTER_EPS
    assert torch.allclose(scorer.center[far], mean[far], atol=1e-5)
    assert torch.equal(scorer.center[~far].abs(), torch.full_like(scorer.center[~far], CENTER_EPS))
    assert (scorer.center.abs() >= CENTER_EPS).all()


def test_training_pulls_the_embeddings_towards_a_fixed_center(tiny_dataset, trained):
    assert len(trained.train_losses_) == TINY["epochs"]
    assert trained.train_losses_[-1] < 0.5 * trained.train_losses_[0]


def test_partial_fit_fine_tunes_around_the_same_center(tiny_dataset):
    train = list(open_dataset(tiny_dataset).train)
    model = create_model("deepsvdd", **{**TINY, "epochs": 1}).set_runtime(batch_size=4, num_workers=1).fit(train[:6])
    center = model.scorer_.center.clone()
    weights = model.scorer_.encoder.layers[0].weight.clone()
    model.partial_fit(train[6:])
    assert torch.equal(model.scorer_.center, center)
    assert not torch.equal(model.scorer_.encoder.layers[0].weight, weights)
    assert len(model.train_losses_) == 2


def test_the_map_is_higher_on_a_synthetic_defect(tiny_dataset, trained):
    path = open_dataset(tiny_dataset).train[0].image_path
    clean = np.asarray(Image.open(path).convert("RGB").resize((64, 64)))
    defect = clean.copy()
    defect[DEFECT] = (30, 60, 200)
    clean_map, defect_map = (prediction.anomaly_map for prediction in trained.predict([clean, defect]))
    inside = np.zeros(clean_map.shape, dtype=bool)
    inside[DEFECT] = True
    assert defect_map[inside].mean() > 2 * clean_map[inside].mean()
    assert defect_map[inside].mean() > 1.5 * defect_map[~inside].mean()


def test_the_scratch_encoder_fits_and_scores_pixels(tiny_dataset):
    model = create_model("deepsvdd", **{**TINY, "init": "scratch", "epochs": 2}).set_runtime(batch_size=4, num_workers=1)
    model.fit(tiny_dataset)
    assert model.scorer_.embed(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    assert model.scorer_(torch.rand(2, 3, 64, 64)).patch_scores.shape == (2, 8, 8)


def test_bad_deepsvdd_parameters_are_rejected(tiny_dataset):
    with pytest.raises(FlawmapError, match="init must be one of pretrained, scratch"):
        create_model("deepsvdd", init="imagenet").fit(tiny_dataset)
    with pytest.raises(FlawmapError, match="rep_dim"):
        create_model("deepsvdd", rep_dim=0).fit(tiny_dataset)
