"""Tests for flawmap.models.rlr: attention windows and masks, shapes, training, saving, resuming."""

from __future__ import annotations

import itertools

import pytest
from conftest import assert_same_predictions, random_images
import torch

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


TINY = {"hidden_dim": 8, "num_heads": 2, "window_size": 3, "train_batch_size": 2}


def synthetic_levels(n_images: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Two levels shaped like stride-8 and stride-16 features of a 64 x 64 image: (n, C, h, w)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n_images, 6, 8, 8, generator=generator), torch.randn(n_images, 10, 4, 4, generator=generator)]


def fit_on_features(levels: list[torch.Tensor], **params) -> RLR:
    """Run RLR's training hook on feature tensors, without a backbone."""
    model = RLR(**{**TINY, **params})
    model._validate_params()
    model._fit(iter([levels]))
    return model


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
    assert model.level_grids_ == [[8, 8], [4, 4]]
    for network, level in zip(model.networks_, levels):
        tokens = network.tokens(level)
        assert tokens.shape == (4, level.shape[-2] * level.shape[-1], level.shape[1])
        assert network(tokens).shape == tokens.shape
    with torch.inference_mode():
        scored = model._score(levels)
    assert scored.patch_scores.shape == (4, 8, 8)
    assert scored.image_scores is None
    assert torch.isfinite(scored.patch_scores).all()


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
    for name, tensor in first._state().items():
        assert torch.equal(tensor, second._state()[name]), name


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    levels = synthetic_levels()
    uninterrupted = fit_on_features(levels, epochs=4, checkpoint_dir=str(tmp_path / "straight"))
    fit_on_features(levels, epochs=2, checkpoint_dir=str(tmp_path / "resumed"))  # "interrupted" after epoch 2
    resumed = fit_on_features(levels, epochs=4, checkpoint_dir=str(tmp_path / "resumed"))
    assert resumed.train_losses_ == uninterrupted.train_losses_
    for name, tensor in uninterrupted._state().items():
        assert torch.equal(tensor, resumed._state()[name]), name
    assert len(list((tmp_path / "resumed").glob("*.safetensors"))) == 1  # older epochs are cleaned up

    with pytest.raises(FlawmapError, match="other settings"):
        fit_on_features(levels, epochs=4, learning_rate=0.5, checkpoint_dir=str(tmp_path / "resumed"))
    with pytest.raises(FlawmapError, match="more than epochs"):
        fit_on_features(levels, epochs=3, checkpoint_dir=str(tmp_path / "resumed"))


def test_save_load_round_trip(tmp_path):
    images = random_images(0, 4)
    model = create_model("rlr", image_size=64, epochs=2, num_workers=1, **TINY).fit(images)
    model.save(tmp_path / "model")
    loaded = AnomalyModel.load(tmp_path / "model")
    assert isinstance(loaded, RLR) and loaded.level_grids_ == model.level_grids_
    assert loaded.train_losses_ == model.train_losses_
    assert_same_predictions(model, loaded, images[:2])


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
