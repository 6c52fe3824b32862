import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_predictions, random_images

from safetensors.torch import load_file, save_file

from flawmap.backbones import create_backbone
from flawmap.cli import _given_hyperparameters, build_parser
from flawmap.errors import FlawmapError
from flawmap.features import flatten_positions, fuse_levels
from flawmap.models import Fyd, Padim, load_model
from flawmap.models import fyd as fyd_module
from flawmap.models.scorer import PatchScores
from flawmap.models.fyd import Alignment, FydScorer, compose, invert, warp
from flawmap.models.padim import GaussianAccumulator, mahalanobis_distances, regularised_inverse
from flawmap.training import train


def shifted_disks(n_images: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Ringed disks on a dark background, each shifted by up to 10% of the side: a misaligned set."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = []
    for _ in range(n_images):
        centre = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
        disk = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < (size / 4) ** 2
        ring = np.abs(np.hypot(rows - centre[0], cols - centre[1]) - size / 6) < 2
        grey = np.where(disk, 200, 30) - np.where(ring, 120, 0)
        images.append(np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8))
    return images


def quick_fyd(**params) -> Fyd:
    return Fyd(**{**Fyd.quick_params, **params}).set_runtime(batch_size=4)


@pytest.fixture(scope="module")
def aligned_model() -> Fyd:
    """Trained for a few epochs on disks that are not aligned."""
    return quick_fyd(epochs=12, learning_rate=1e-2).fit(shifted_disks(8))


def untrained_scorer(**params) -> FydScorer:
    model = quick_fyd(**params)
    return model._new_scorer(create_backbone(model.backbone), ("stage3", "stage5")).eval()


def test_untrained_alignment_is_padim():
    """Transformers start at the identity and the projector's residual at zero: PaDiM's features."""
    scorer = untrained_scorer()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first_level, image_theta = scorer.first_level(images)
        aligned = scorer.aligned_features(first_level)
        padim = scorer.padim_features(images)
    identity = torch.eye(2, 3).expand(3, 2, 3)
    torch.testing.assert_close(image_theta, identity)
    torch.testing.assert_close(aligned.theta, identity)
    torch.testing.assert_close(aligned.projected, padim, atol=1e-4, rtol=1e-4)


def test_later_stages_read_the_warped_first_level():
    """FCA is chained: stage5 is computed from the warped stage3 map, then warped itself."""
    scorer = untrained_scorer()
    with torch.no_grad():
        scorer.alignment.levels[0].head[-1].bias.copy_(torch.tensor([0.5, 0.3, -0.2]))
        scorer.alignment.levels[1].head[-1].bias.copy_(torch.tensor([-0.4, 0.0, 0.3]))
        first_level = torch.rand(2, 40, 8, 8, generator=torch.Generator().manual_seed(1))
        aligned = scorer.aligned_features(first_level)
        warped_first, _, _ = scorer.alignment.levels[0](first_level)
        (deeper,) = scorer.backbone.features_after(warped_first, "stage3", ["stage5"])
        warped_deeper, _, _ = scorer.alignment.levels[1](deeper)
        chained = fuse_levels([warped_first, warped_deeper]).index_select(1, scorer.channel_indices)
        (unchained_deeper,) = scorer.backbone.features_after(first_level, "stage3", ["stage5"])
    torch.testing.assert_close(aligned.selected, chained)
    assert not torch.allclose(scorer.alignment.levels[1](unchained_deeper)[0], warped_deeper, atol=1e-3)


def test_taps_must_be_in_stage_order():
    with pytest.raises(FlawmapError, match="stage order"):
        quick_fyd(taps=("stage5", "stage3")).fit(random_images(0, 3))


def test_inverse_and_composition_of_affine_maps():
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(4, 2, 3, generator=generator), torch.randn(4, 2, 3, generator=generator)
    square = lambda theta: torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(theta.shape[0], 1, 3)], dim=1)
    torch.testing.assert_close(square(compose(first, second)), square(first) @ square(second))
    torch.testing.assert_close(square(invert(first)), torch.linalg.inv(square(first)), rtol=1e-4, atol=1e-4)


def test_maps_return_to_the_input_frame():
    """A map warped into the aligned frame comes back where it was (inside the frame)."""
    angle, shift = math.radians(10.0), 0.1
    image_theta = torch.tensor([[[math.cos(angle), -math.sin(angle), shift], [math.sin(angle), math.cos(angle), 0.0]]])
    level_theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, -shift]]])
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    original = torch.exp(-((rows - 15) ** 2 + (cols - 17) ** 2) / 60.0).unsqueeze(0)  # (1, 32, 32), a blob
    in_aligned_frame = warp(original.unsqueeze(1), compose(image_theta, level_theta)).squeeze(1)
    assert (in_aligned_frame - original).abs().max() > 0.2  # it moved
    back = Alignment.to_input_frame(in_aligned_frame, compose(image_theta, level_theta))
    torch.testing.assert_close(back[:, 6:26, 6:26], original[:, 6:26, 6:26], atol=0.03, rtol=0)


def test_alignment_losses_fall_and_the_model_keeps_them(aligned_model, tmp_path):
    for losses in (aligned_model.image_alignment_losses_, aligned_model.feature_alignment_losses_):
        assert len(losses) == 12 and losses[-1] < losses[0]
    loaded = Fyd.load(aligned_model.save(tmp_path / "model"))
    assert loaded.image_alignment_losses_ == aligned_model.image_alignment_losses_
    assert_same_predictions(aligned_model, loaded, shifted_disks(2, seed=1), rel=1e-6)


def test_image_alignment_reduces_the_spread_of_training_images(aligned_model):
    images = torch.from_numpy(np.stack(shifted_disks(8))).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        warped, _ = aligned_model.scorer_.alignment.align_images(images)
    spread = lambda batch: (batch - batch.mean(dim=0)).square().mean().item()
    assert spread(warped) < 0.8 * spread(images)


def test_the_trained_projector_changes_the_features_and_keeps_their_spread(aligned_model):
    """L_NC trains what the Gaussians model; the variance floor keeps it from collapsing."""
    images = torch.from_numpy(np.stack(shifted_disks(8))).permute(0, 3, 1, 2).float() / 255.0
    scorer = aligned_model.scorer_
    with torch.no_grad():
        aligned = scorer.aligned_features(scorer.first_level(images)[0])
    change = (aligned.projected - aligned.selected).abs().mean() / aligned.selected.abs().mean()
    spread = lambda features: features.transpose(0, 1).flatten(1).std(dim=1)
    assert change > 0.01
    assert (spread(aligned.projected) >= 0.9 * spread(aligned.selected)).all()


def test_calibration_holds_normal_images_out(monkeypatch):
    """The networks never learn from the images the threshold comes from; the Gaussians take them
    in, and each is scored against the Gaussians without its own moments."""
    trained_on = []

    def spy(network, data, loss, **settings):
        trained_on.append(data[0].detach().clone())
        return train(network, data, loss, **settings)

    monkeypatch.setattr(fyd_module, "train", spy)
    images = shifted_disks(8)
    model = quick_fyd(epochs=2).fit(images)
    held = model.calibration_images_
    n_held, n_trained = held.shape[0], model.n_train_images_
    assert n_held >= 1 and n_trained + n_held == 8 and model.gaussians_.count == 8
    keys = [np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes() for image in images]  # as held (3 x S x S)
    held_bytes = {image.numpy().tobytes() for image in held}
    assert held_bytes <= set(keys)
    image_data, level_data = trained_on  # the image transformer's images; the first-tap maps
    assert image_data.shape[0] == n_trained and level_data.shape[0] == n_trained
    assert not held_bytes & {image.numpy().tobytes() for image in image_data}
    # each held-out image against Gaussians refitted on the 7 other images' aligned features (the
    # downdate treats the regulariser as scaled by (N - 1) / (N - 2), PaDiM's docstring)
    scorer = model.scorer_
    everything = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        features = flatten_positions(scorer.aligned_features(scorer.first_level(everything)[0]).projected)
        expected = []
        for image in held:
            others = [k for k, key in enumerate(keys) if key != image.numpy().tobytes()]
            gaussians = GaussianAccumulator()
            gaussians.add(features[others])
            inverse = regularised_inverse(gaussians.covariance(), model.epsilon)
            distances, theta = scorer.aligned_distances(image[None].float() / 255.0)
            query = features[[keys.index(image.numpy().tobytes())]]
            left_out = mahalanobis_distances(query, gaussians.mean(), inverse).float().view_as(distances)
            expected.append(model._postprocess(PatchScores(scorer.alignment.to_input_frame(left_out, theta)))[0][0])
    in_sample, _ = model.score_images(held.float() / 255.0)
    np.testing.assert_allclose(model.calibration_scores_, expected, rtol=1e-4)  # exact, up to float32 maps
    assert (np.asarray(model.calibration_scores_) > 1.5 * in_sample).all()
    # partial_fit keeps the networks; every image reaches the Gaussians, every held-out image is rescored
    weights = {name: t.clone() for name, t in scorer.alignment.state_dict().items()}
    model.partial_fit(shifted_disks(6, seed=3))
    assert len(trained_on) == 2 and model.gaussians_.count == 14
    assert model.n_train_images_ + model.calibration_images_.shape[0] == 14
    assert len(model.calibration_scores_) == model.calibration_images_.shape[0]
    assert all(torch.equal(t, weights[name]) for name, t in scorer.alignment.state_dict().items())


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_each_stage_keeps_the_epoch_its_held_out_criterion_selects(monkeypatch, direction):
    """A criterion that grows with training keeps both stages untrained (PaDiM's features); one
    that falls keeps the last epoch."""
    calls = []

    def criterion(self, first_levels, held_levels):
        calls.append(None)
        return torch.full((3,), direction * len(calls))  # per held-out image; no spread

    monkeypatch.setattr(Fyd, "_validation_distance", criterion)
    model = quick_fyd(epochs=2).fit(shifted_disks(8))
    assert len(calls) == 6 and len(model.image_alignment_validation_) == 3
    untrained = model._new_scorer(create_backbone(model.backbone), model.taps_).alignment.state_dict()
    unchanged = [torch.equal(t, untrained[name]) for name, t in model.scorer_.alignment.state_dict().items()]
    if direction > 0:
        assert model.alignment_epochs_ == [0, 0] and all(unchanged)
    else:
        assert model.alignment_epochs_ == [2, 2] and not all(unchanged)


def test_fyd_models_of_format_6_load_or_fail_in_one_line(aligned_model, tmp_path):
    """Aligned models of format 6 (unchained, no projector) must be refitted; align=False ones load."""
    target = aligned_model.save(tmp_path / "aligned")
    config = json.loads((target / "config.json").read_text())
    config["format_version"] = 6
    (target / "config.json").write_text(json.dumps(config))
    tensor_file = target / config["files"]["model"]
    old = {name: t for name, t in load_file(tensor_file).items() if ".projector." not in name}
    save_file(old, tensor_file)
    with pytest.raises(FlawmapError, match="saved before format 7.*fit it again") as error:
        load_model(target)
    assert "\n" not in str(error.value)
    plain = quick_fyd(align=False).fit(random_images(3, 4))
    plain_target = plain.save(tmp_path / "plain")
    config = json.loads((plain_target / "config.json").read_text())
    config["format_version"] = 6
    (plain_target / "config.json").write_text(json.dumps(config))
    assert_same_predictions(plain, load_model(plain_target, batch_size=4), random_images(4, 2), rel=1e-6)


def test_without_alignment_it_is_padim_on_the_same_features(tmp_path):
    images = random_images(3, 6)
    plain = quick_fyd(align=False).fit(images)
    padim = Padim(image_size=64, n_features=24).set_runtime(batch_size=4).fit(images)
    assert plain.scorer_.alignment is None and plain.image_alignment_losses_ == []
    assert torch.equal(plain.scorer_.channel_indices, padim.scorer_.channel_indices)
    assert_same_predictions(padim, plain, random_images(4, 2), rel=1e-5)
    assert plain.n_train_images_ == 6  # cross-fitted as PaDiM: nothing held out
    np.testing.assert_allclose(plain.calibration_scores_, padim.calibration_scores_, rtol=1e-5)
    _, tensors = plain.to_state()
    assert not any(name.startswith("alignment.") for name in tensors)


@pytest.mark.parametrize(
    "params", [{"epochs": 0}, {"learning_rate": 0.0}, {"max_rotation": 0.0}, {"max_shift": 0.6}, {"n_features": 0}]
)
def test_rejects_bad_parameters(params):
    with pytest.raises(FlawmapError):
        quick_fyd(**params).fit(random_images(0, 3))


def test_no_align_flag_is_align_false():
    parse = lambda *flags: build_parser().parse_args(["fit", "data", "--out", "m", *flags])
    assert _given_hyperparameters(parse("--no-align"), "fyd") == {"align": False}
    assert _given_hyperparameters(parse("--align", "false"), "fyd") == {"align": False}
    assert _given_hyperparameters(parse(), "fyd") == {}
    with pytest.raises(FlawmapError, match="--align does not apply to method 'padim'"):
        _given_hyperparameters(parse("--no-align"), "padim")
