"""Tests for flawmap.models.rlr: attention windows and masks, shapes, training, saving, resuming,
continuing training with partial_fit."""

from __future__ import annotations

import itertools
import math

import pytest
from conftest import assert_same_predictions, random_images
import torch

from flawmap.backbones import BACKBONES, Backbone, FeatureInfo
from flawmap.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from flawmap.errors import FlawmapError
from flawmap.models import AnomalyModel, create_model
from flawmap.models.rlr import (
    RLR,
    LocalCrossAttention,
    MaskedLearnableKeyAttention,
    level_window,
    window_mask,
    window_neighbours,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: threads only add synchronisation, which dominates on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {"image_size": 64, "hidden_dim": 8, "num_heads": 2, "window_size": 3, "train_batch_size": 2}


class DeclaredTapsBackbone(Backbone):
    """Declares two taps shaped like 6-channel stride-8 and 10-channel stride-16 levels; never
    run: the tests below feed RLR features directly."""

    def __init__(self) -> None:
        taps = [FeatureInfo("s8", 6, 8), FeatureInfo("s16", 10, 16)]
        super().__init__(name="declared", feature_info=taps, default_taps=("s8", "s16"), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self._freeze()


def synthetic_levels(n_images: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Two levels shaped like the declared taps of a 64 x 64 image: (n, 6, 8, 8), (n, 10, 4, 4)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n_images, 6, 8, 8, generator=generator), torch.randn(n_images, 10, 4, 4, generator=generator)]


def fit_on_features(levels: list[torch.Tensor], **params) -> RLR:
    """RLR's first fit on feature tensors, without a backbone pass."""
    model = RLR(**{**TINY, **params})
    model._validate_params()
    model.taps_ = ("s8", "s16")
    model.scorer_ = model._new_scorer(DeclaredTapsBackbone(), model.taps_)
    model.n_fits_ = 0
    model._learn(iter([levels]))
    return model


def network_state(model: RLR) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.scorer_.networks.state_dict().items()}


def assert_same_networks(first: RLR, second: RLR) -> None:
    second_state = network_state(second)
    for name, tensor in network_state(first).items():
        assert torch.equal(tensor, second_state[name]), name


def brute_force_window(grid_hw: tuple[int, int], window: int) -> set[tuple[int, int]]:
    """All (i, j) position pairs with j inside the window of i, by enumeration."""
    radius = window // 2
    positions = list(itertools.product(range(grid_hw[0]), range(grid_hw[1])))
    return {
        (a[0] * grid_hw[1] + a[1], b[0] * grid_hw[1] + b[1])
        for a in positions
        for b in positions
        if abs(a[0] - b[0]) <= radius and abs(a[1] - b[1]) <= radius
    }


def changed_outputs(
    module: torch.nn.Module, position: int, inputs: torch.Tensor, reference: torch.Tensor, *, perturb_reference: bool
) -> torch.Tensor:
    """Bool (N,): which output tokens change when one input (or reference) token is perturbed."""
    with torch.no_grad():
        before = module(inputs, reference)
        inputs, reference = inputs.clone(), reference.clone()
        (reference if perturb_reference else inputs[0])[position] += 5.0
        after = module(inputs, reference)
    return ((after - before).abs().amax(dim=-1) > 1e-5)[0]


def test_window_mask_covers_exactly_each_window():
    grid_hw, window = (5, 6), 3
    mask = window_mask(grid_hw, window)
    assert mask.shape == (30, 30)
    assert set(map(tuple, mask.nonzero().tolist())) == brute_force_window(grid_hw, window)


def test_mlka_masks_exactly_each_tokens_own_window():
    torch.manual_seed(0)
    grid_hw, window = (5, 5), 3
    module = MaskedLearnableKeyAttention(8, 2, grid_hw, window)
    inputs, reference = torch.randn(1, 25, 8), torch.randn(25, 8)
    centre = 12  # (2, 2)
    inside = window_mask(grid_hw, window)[centre]
    for position in range(25):
        changed = changed_outputs(module, position, inputs, reference, perturb_reference=False)
        if position != centre:
            # The centre's output ignores the values of its own window, and only those.
            assert bool(changed[centre]) == (not bool(inside[position])), position
    unmasked = MaskedLearnableKeyAttention(8, 2, grid_hw, None)
    unmasked.load_state_dict(module.state_dict())
    assert changed_outputs(unmasked, centre + 1, inputs, reference, perturb_reference=False)[centre]


def test_lca_window_has_the_configured_size():
    grid_hw, window = (6, 7), 5
    index, valid = window_neighbours(grid_hw, window)
    assert index.shape == valid.shape == (42, 25)
    pairs = {(i, j) for i in range(42) for j, ok in zip(index[i].tolist(), valid[i].tolist()) if ok}
    assert pairs == brute_force_window(grid_hw, window)
    assert int(valid[2 * 7 + 3].sum()) == 25  # an interior position sees the whole 5 x 5 window

    torch.manual_seed(0)
    module = LocalCrossAttention(8, 2, grid_hw, window)
    inputs, reference = torch.randn(1, 42, 8), torch.randn(42, 8)
    changed = torch.stack(
        [changed_outputs(module, j, inputs, reference, perturb_reference=True) for j in range(42)], dim=1
    )
    assert torch.equal(changed, window_mask(grid_hw, window))  # output i reads reference j iff j is in i's window


def test_coarser_levels_get_windows_covering_the_same_area():
    assert level_window(7, 32, 32) == 7
    assert level_window(7, 32, 16) == 5
    assert level_window(7, 32, 8) == 3
    assert level_window(1, 32, 16) == 1


def test_shapes_per_level():
    levels = synthetic_levels()
    model = fit_on_features(levels, epochs=1)
    for network, level in zip(model.scorer_.networks, levels):
        tokens = network.tokens(level)
        assert tokens.shape == (4, level.shape[-2] * level.shape[-1], level.shape[1])
        assert network(tokens).shape == tokens.shape
    with torch.inference_mode():
        scored = model.scorer_.score(levels)
    assert scored.patch_scores.shape == (4, 8, 8)
    assert scored.image_scores is None
    assert torch.isfinite(scored.patch_scores).all()


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_network_grids_match_the_embedded_levels(backbone):
    """Grids are ceil(image_size / stride), also where the stride does not divide the size."""
    architecture = BACKBONES.get(backbone)()  # random weights: only the shapes matter
    model = RLR(**{**TINY, "image_size": 72})
    scorer = model._new_scorer(architecture, architecture.default_taps)
    with torch.inference_mode():
        levels = scorer.embed(torch.rand(1, 3, 72, 72))
    assert [tuple(level.shape[-2:]) for level in levels] == [(9, 9), (5, 5)]
    for network, level in zip(scorer.networks, levels):
        assert network.reference.shape == (level.shape[-2] * level.shape[-1], level.shape[1])
    with torch.inference_mode():
        assert scorer.score(levels).patch_scores.shape == (1, 9, 9)


def test_tiny_model_overfits_a_tiny_set():
    generator = torch.Generator().manual_seed(1)
    pattern = [torch.randn(1, 6, 8, 8, generator=generator), torch.randn(1, 10, 4, 4, generator=generator)]
    levels = [p + 0.01 * torch.randn(3, *p.shape[1:], generator=generator) for p in pattern]
    model = fit_on_features(levels, epochs=40, learning_rate=1e-2, jitter_scale=0.0, hidden_dim=16)
    assert model.train_losses_[-1] < model.train_losses_[0] / 10


def test_training_is_seeded():
    first = fit_on_features(synthetic_levels(), epochs=2, random_state=3)
    second = fit_on_features(synthetic_levels(), epochs=2, random_state=3)
    assert first.train_losses_ == second.train_losses_
    assert_same_networks(first, second)


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    levels = synthetic_levels()
    uninterrupted = fit_on_features(levels, epochs=4, checkpoint_dir=str(tmp_path / "straight"))
    fit_on_features(levels, epochs=2, checkpoint_dir=str(tmp_path / "resumed"))  # "interrupted" after epoch 2
    resumed = fit_on_features(levels, epochs=4, checkpoint_dir=str(tmp_path / "resumed"))
    assert resumed.train_losses_ == uninterrupted.train_losses_
    assert_same_networks(resumed, uninterrupted)
    assert (tmp_path / "resumed" / "fit-1" / "training.json").is_file()

    with pytest.raises(FlawmapError, match="other settings"):
        fit_on_features(levels, epochs=4, learning_rate=0.5, checkpoint_dir=str(tmp_path / "resumed"))
    with pytest.raises(FlawmapError, match="other settings or training data"):
        fit_on_features(synthetic_levels(seed=1), epochs=4, checkpoint_dir=str(tmp_path / "resumed"))
    with pytest.raises(FlawmapError, match="more than epochs"):
        fit_on_features(levels, epochs=3, checkpoint_dir=str(tmp_path / "resumed"))


def test_save_load_round_trip(tmp_path):
    images = random_images(0, 4)
    model = create_model("rlr", **{**TINY, "epochs": 2}).set_runtime(num_workers=1).fit(images)
    model.save(tmp_path / "model")
    loaded = AnomalyModel.load(tmp_path / "model")
    assert isinstance(loaded, RLR) and loaded.train_losses_ == model.train_losses_
    assert_same_networks(loaded, model)
    assert_same_predictions(model, loaded, images[:2])


def test_partial_fit_continues_training(tmp_path):
    model = create_model("rlr", **{**TINY, "epochs": 2, "checkpoint_dir": str(tmp_path)}).set_runtime(num_workers=1)
    model.fit(random_images(0, 6))
    first_losses, first_state = list(model.train_losses_), network_state(model)
    model.partial_fit(random_images(1, 6))
    assert len(model.train_losses_) == 4 and model.train_losses_[:2] == first_losses
    state = network_state(model)
    for name in ("feature_mean", "feature_std"):  # the standardisation of the first fit is kept
        assert torch.equal(state[f"0.{name}"], first_state[f"0.{name}"])
    assert not torch.equal(state["0.reference"], first_state["0.reference"])
    assert not torch.equal(state["1.head.weight"], first_state["1.head.weight"])
    assert all(math.isfinite(prediction.score) for prediction in model.predict(random_images(2, 2)))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fit-1", "fit-2"]  # one checkpoint per fit


@pytest.mark.parametrize(
    "params, message",
    [
        ({"window_size": 4}, "window_size"),
        ({"hidden_dim": 10}, "hidden_dim"),
        ({"hidden_dim": 8, "num_heads": 3}, "num_heads"),
        ({"epochs": 0}, "epochs"),
        ({"jitter_scale": -1.0}, "jitter_scale"),
    ],
)
def test_invalid_parameters_are_rejected(params, message):
    with pytest.raises(FlawmapError, match=message):
        RLR(**params)._validate_params()


def test_window_larger_than_the_grid_is_rejected():
    with pytest.raises(FlawmapError, match="no unmasked position"):
        fit_on_features(synthetic_levels(), window_size=7, epochs=1)


def test_cli_flags_reach_the_model():
    from flawmap.cli import _given_hyperparameters, build_parser

    args = build_parser().parse_args(
        ["fit", "a", "b", "--method", "rlr", "--out", "m", "--mlka-mask", "false", "--epochs", "3", "--checkpoint-dir", "c"]
    )
    assert [str(path) for path in args.data] == ["a", "b"]
    assert _given_hyperparameters(args, "rlr") == {"mlka_mask": False, "epochs": 3, "checkpoint_dir": "c"}
