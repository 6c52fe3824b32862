import math

import numpy as np
import pytest
import torch
from conftest import assert_same_predictions, random_images

from flawmap.cli import _given_hyperparameters, build_parser
from flawmap.errors import FlawmapError
from flawmap.models import Fyd, Padim
from flawmap.models.fyd import Alignment, compose, invert, warp


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


def test_transformers_start_at_the_identity():
    torch.manual_seed(0)
    alignment = Alignment([(40, 8, 8), (112, 4, 4)], image_size=64, max_rotation=30.0, max_shift=0.15)
    images = torch.rand(3, 3, 64, 64)
    warped, theta = alignment.align_images(images)
    identity = torch.eye(2, 3).expand(3, 2, 3)
    torch.testing.assert_close(theta, identity)
    torch.testing.assert_close(warped, images, atol=1e-5, rtol=0)
    levels = [torch.rand(3, 40, 8, 8), torch.rand(3, 112, 4, 4)]
    aligned, level_theta = alignment.align_levels(levels)
    torch.testing.assert_close(level_theta, identity)
    for before, after in zip(levels, aligned):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


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
    back = Alignment.to_input_frame(in_aligned_frame, image_theta, level_theta)
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


def test_without_alignment_it_is_padim_on_the_same_features(tmp_path):
    images = random_images(3, 6)
    plain = quick_fyd(align=False).fit(images)
    padim = Padim(image_size=64, n_features=24).set_runtime(batch_size=4).fit(images)
    assert plain.scorer_.alignment is None and plain.image_alignment_losses_ == []
    assert torch.equal(plain.scorer_.channel_indices, padim.scorer_.channel_indices)
    assert_same_predictions(padim, plain, random_images(4, 2), rel=1e-5)
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
