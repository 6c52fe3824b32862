"""Tests for flawmap.models.rlr: attention windows and masks, shapes, training, saving, resuming,
continuing training with partial_fit."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import assert_same_predictions, random_images
import torch
import torch.nn.functional as F
from PIL import Image

from flawmap.backbones import BACKBONES, Backbone, FeatureInfo
from flawmap.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from flawmap.errors import FlawmapError
from flawmap.features import flatten_positions
from flawmap.models import AnomalyModel, create_model
from flawmap.models.rlr import (
    MultiHeadAttention,
    RLR,
    ReferenceLayer,
    ReferenceReconstructor,
    feature_jitter,
    level_window,
    sincos_position_encoding,
    window_mask,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only add synchronisation


TINY = {"image_size": 64, "hidden_dim": 8, "depth": 1, "num_heads": 2, "window_size": 3, "train_batch_size": 2}


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


def changed_outputs(layer: ReferenceLayer, position: int, *, perturb_reference: bool) -> torch.Tensor:
    """Bool (N, N): which output tokens of a layer on the 5 x 5 grid change when input (or
    reference) token ``position`` is perturbed."""
    torch.manual_seed(0)
    inputs, reference = torch.randn(1, 25, 8), torch.randn(1, 25, 8)
    own_window = window_mask(GRID, WINDOW)
    with torch.no_grad():
        before = layer(inputs, reference, own_window)
        (reference if perturb_reference else inputs)[0, position] += 5.0
        after = layer(inputs, reference, own_window)
    return ((after - before).abs().amax(dim=-1) > 1e-5)[0]


GRID, WINDOW = (5, 5), 3


def reads(blocks: tuple[str, ...], *, perturb_reference: bool) -> torch.Tensor:
    """Bool (N, N): output i of a one-attention layer changes when token j is perturbed."""
    torch.manual_seed(0)
    layer = ReferenceLayer(8, 2, blocks, dropout=0.0).eval()
    return torch.stack([changed_outputs(layer, j, perturb_reference=perturb_reference) for j in range(25)], dim=1)


def test_window_mask_covers_exactly_each_window():
    grid_hw, window = (5, 6), 3
    mask = window_mask(grid_hw, window)
    assert mask.shape == (30, 30)
    assert set(map(tuple, mask.nonzero().tolist())) == brute_force_window(grid_hw, window)


def test_lca_reads_the_reference_only_inside_the_own_window():
    inside = window_mask(GRID, WINDOW)
    assert int(inside.sum(dim=1).max()) == 9 and int(inside[0].sum()) == 4  # clipped at the corner
    assert torch.equal(reads(("lca",), perturb_reference=True), inside)
    # An input token only chooses (its own query): no value of the input passes to another token.
    assert torch.equal(reads(("lca",), perturb_reference=False), torch.eye(25, dtype=torch.bool))


@pytest.mark.parametrize("blocks", [("mlka",), ("msa",)])
def test_masked_attentions_never_read_values_inside_the_own_window(blocks):
    read = reads(blocks, perturb_reference=False)
    others = ~torch.eye(25, dtype=torch.bool)  # a perturbed token also changes its own query
    assert torch.equal(read & others, ~window_mask(GRID, WINDOW))
    if blocks == ("mlka",):  # keys come from the reference: the same pattern
        assert torch.equal(reads(blocks, perturb_reference=True), ~window_mask(GRID, WINDOW))


def test_plain_self_attention_reads_every_token():
    assert reads(("sa",), perturb_reference=False).all()


def by_hand_attention(attention, queries, keys, values, allowed):
    """Multi-head attention from torch.nn.functional, ``allowed`` (N, N) or None."""
    heads = attention.num_heads

    def project(linear, x):
        projected = F.linear(x, linear.weight, linear.bias)
        return projected.reshape(*x.shape[:2], heads, -1).transpose(1, 2)  # (B, H, N, c)

    q, k, v = project(attention.query, queries), project(attention.key, keys), project(attention.value, values)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    mixed = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(queries.shape)
    return F.linear(mixed, attention.out.weight, attention.out.bias)


def by_hand_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias)


def test_network_data_flow_matches_the_official_layer():
    """x' = LN(2 LCA(x, r, r) + MLKA(x, r, x)), out = LN(x' + FFN(x')), a final LN and a head,
    with the reference embedded by its own projection."""
    torch.manual_seed(0)
    grid_hw, window = (4, 4), 3
    network = ReferenceReconstructor(6, grid_hw, 8, 1, 2, window, ("lca", "mlka"), dropout=0.0).eval()
    for norm in (network.layers[0].norm1, network.layers[0].norm2, network.norm):  # pin the norms' affine maps
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    tokens = torch.randn(2, 16, 6)
    position = sincos_position_encoding(grid_hw, 8)
    own_window = torch.zeros(16, 16, dtype=torch.bool)
    for i, j in brute_force_window(grid_hw, window):
        own_window[i, j] = True

    x = F.linear(tokens, network.embed.weight, network.embed.bias) + position
    r = (F.linear(network.reference, network.reference_embed.weight, network.reference_embed.bias) + position).expand(2, -1, -1)
    layer = network.layers[0]
    lca = by_hand_attention(layer.attentions["lca"], x, r, r, own_window)
    mlka = by_hand_attention(layer.attentions["mlka"], x, r, x, ~own_window)
    hidden = by_hand_norm(layer.norm1, 2 * lca + 1 * mlka)
    first, _, second, _ = layer.feed_forward
    ffn = F.linear(F.gelu(F.linear(hidden, first.weight, first.bias)), second.weight, second.bias)
    out = by_hand_norm(layer.norm2, hidden + ffn)
    expected = F.linear(by_hand_norm(network.norm, out), network.head.weight, network.head.bias)
    assert first.out_features == 4 * 8  # FFN width 4 d
    with torch.no_grad():
        assert torch.allclose(network(tokens), expected, rtol=1e-4, atol=1e-5)


def test_position_encoding_has_the_official_layout():
    encoding = sincos_position_encoding((3, 4), 8)  # frequencies 1 and 1/100 for d = 8
    row, col = 1, 2
    token = encoding[row * 4 + col]
    expected = [math.sin(col), math.cos(col), math.sin(col / 100), math.cos(col / 100),
                math.sin(row), math.cos(row), math.sin(row / 100), math.cos(row / 100)]
    assert torch.allclose(token, torch.tensor(expected), atol=1e-6)


def test_jitter_scales_with_the_token_norm_over_the_channel_count():
    tokens = torch.randn(2, 5, 6)
    jittered = feature_jitter(tokens, 4.0, torch.Generator().manual_seed(7))
    noise = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(jittered - tokens, noise * tokens.norm(dim=-1, keepdim=True) / 6 * 4.0, atol=1e-6)


def test_coarser_levels_get_windows_covering_the_same_area():
    assert level_window(7, 32, 32) == 7
    assert level_window(7, 32, 16) == 5
    assert level_window(7, 32, 8) == 3
    assert level_window(1, 32, 16) == 1


@pytest.mark.parametrize("blocks", ["lca+mlka", "sa", "msa", "lca"])
def test_shapes_per_level(blocks):
    levels = synthetic_levels()
    model = fit_on_features(levels, epochs=1, blocks=blocks)
    for level_index, (network, level) in enumerate(zip(model.scorer_.networks, levels)):
        tokens = flatten_positions(level)
        assert network(tokens).shape == tokens.shape == (4, level.shape[-2] * level.shape[-1], level.shape[1])
        assert network.embed.out_features == TINY["hidden_dim"] * 2**level_index  # coarser levels twice as wide
        assert (network.reference is None) == (blocks in ("sa", "msa"))
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
        ({"dropout": 1.0}, "dropout"),
        ({"blocks": "lca+attention"}, "blocks"),
        ({"blocks": "lca+lca"}, "blocks"),
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
        ["fit", "a", "b", "--method", "rlr", "--out", "m", "--blocks", "sa", "--epochs", "3", "--checkpoint-dir", "c"]
    )
    assert [str(path) for path in args.data] == ["a", "b"]
    assert _given_hyperparameters(args, "rlr") == {"blocks": "sa", "epochs": 3, "checkpoint_dir": "c"}


class Created(Exception):
    """Raised by a stand-in create_model with the parameters it was given."""


def test_cli_preset_applies_before_explicit_flags(monkeypatch, tmp_path):
    from flawmap import cli

    def capture(method, **params):
        raise Created(method, params)

    monkeypatch.setattr("flawmap.models.create_model", capture)  # the commands import what they call when they run
    folder = tmp_path / "good"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "0.png")  # the parser checks the data path
    with pytest.raises(Created) as created:
        cli.run_fit(cli.build_parser().parse_args(
            ["fit", str(folder), "--method", "rlr", "--out", str(tmp_path / "m"), "--preset", "paper", "--epochs", "3"]
        ))
    method, params = created.value.args
    assert method == "rlr"
    assert params["epochs"] == 3  # the explicit flag wins
    assert {key: params[key] for key in ("hidden_dim", "num_heads", "depth", "learning_rate", "train_batch_size")} == {
        "hidden_dim": 256, "num_heads": 8, "depth": 4, "learning_rate": 1e-4, "train_batch_size": 4
    }
    with pytest.raises(FlawmapError, match="presets are: paper"):
        cli.run_fit(cli.build_parser().parse_args(["fit", str(folder), "--method", "rlr", "--out", str(tmp_path / "m"), "--preset", "x"]))
    with pytest.raises(FlawmapError, match="no presets"):
        cli.run_fit(cli.build_parser().parse_args(["fit", str(folder), "--method", "padim", "--out", str(tmp_path / "m"), "--preset", "paper"]))
    with pytest.raises(FlawmapError, match="--preset cannot be changed by --update"):
        cli.run_fit(cli.build_parser().parse_args(["fit", str(folder), "--update", str(tmp_path / "m"), "--preset", "paper"]))


def test_paper_preset_is_a_valid_model():
    RLR(**RLR.presets["paper"])._validate_params()


def test_attention_starts_as_the_official_multihead_attention():
    """Packed Xavier-uniform query/key/value weights (bound sqrt(6 / 4d), which nn.Linear's default
    bound 1/sqrt(d) never reaches), zero biases, the output weight nn.Linear's default."""
    torch.manual_seed(0)
    dim = 256
    attention = MultiHeadAttention(dim, 8, dropout=0.0)
    packed_bound = math.sqrt(6.0 / (4 * dim))
    for layer in (attention.query, attention.key, attention.value):
        assert 0.97 * packed_bound < layer.weight.abs().max() <= packed_bound
        assert layer.weight.std().item() == pytest.approx(packed_bound / math.sqrt(3.0), rel=0.02)
    assert attention.out.weight.abs().max() <= 1.0 / math.sqrt(dim)
    for layer in (attention.query, attention.key, attention.value, attention.out):
        assert not layer.bias.any()


def test_float32_training_ignores_a_low_runtime_precision():
    """With float32_training a fit under bfloat16 trains exactly as one under float32, caches its
    features in float32, and hands the runtime's precision back for prediction."""
    images = random_images(0, 6)
    params = {**RLR.quick_params, "epochs": 1}

    def losses(precision: str, **extra) -> tuple[list[float], RLR]:
        model = RLR(**params, **extra).set_runtime(precision=precision)
        return model.fit(images).train_losses_, model

    float32_losses, _ = losses("float32", float32_training=True)
    forced_losses, forced = losses("bfloat16", float32_training=True)
    assert forced_losses == float32_losses
    assert losses("bfloat16")[0] != losses("float32")[0]  # the runtime's bfloat16 does reach a plain fit
    assert forced.runtime.precision == "bfloat16" and forced.scorer_.low_precision == torch.bfloat16
    assert forced._cache([[torch.ones(1, 2)]])[0].dtype == torch.float32
    assert RLR()._cache([[torch.ones(1, 2)]])[0].dtype == torch.float16
