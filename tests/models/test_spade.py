import pytest
import torch
from conftest import assert_same_predictions, random_images

import flawmap
from flawmap.errors import FlawmapError
from flawmap.models.spade import PATCH_BANK_DTYPE, Spade, SpadeFeatures


def synthetic_spade(image_neighbors: int, patch_neighbors: int = 1) -> tuple[Spade, torch.Tensor, torch.Tensor]:
    """A Spade with a hand-made state: 6 training images of 2 x 2 patches with 3 channels.

    Pooled features are points on a line (image i at x = i), so the nearest images of a query
    at x = 0.2 are 0, 1, 2, ... in order.
    """
    generator = torch.Generator().manual_seed(0)
    pooled_bank = torch.zeros(6, 4)
    pooled_bank[:, 0] = torch.arange(6.0)
    patch_bank = torch.randn(6, 2, 2, 3, generator=generator).to(PATCH_BANK_DTYPE)
    model = Spade(image_neighbors=image_neighbors, patch_neighbors=patch_neighbors)
    model._set_state({"pooled_bank": pooled_bank, "patch_bank": patch_bank})
    return model, pooled_bank, patch_bank


def test_image_score_is_mean_distance_to_the_k_nearest_images():
    model, _, _ = synthetic_spade(image_neighbors=3)
    pooled = torch.tensor([[0.2, 0.0, 0.0, 0.0], [4.6, 0.0, 0.0, 0.0]])
    scored = model._score(SpadeFeatures(pooled=pooled, patches=torch.zeros(2, 3, 2, 2)))
    # nearest images: 0, 1, 2 at distances 0.2, 0.8, 1.8; and 5, 4, 3 at 0.4, 0.6, 1.6
    torch.testing.assert_close(scored.image_scores, torch.tensor([2.8 / 3, 2.6 / 3]))


def test_patches_are_matched_only_within_the_nearest_images():
    model, _, patch_bank = synthetic_spade(image_neighbors=2)
    # The test image's patches are copies of image 5's, but its pooled feature is nearest images 0 and 1.
    patches = patch_bank[5].float().permute(2, 0, 1).unsqueeze(0)  # (1, 3, 2, 2)
    pooled = torch.tensor([[0.1, 0.0, 0.0, 0.0]])
    scored = model._score(SpadeFeatures(pooled=pooled, patches=patches))
    gallery = patch_bank[[0, 1]].float().reshape(-1, 3)
    expected = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 3), gallery).min(dim=1).values
    assert scored.patch_scores.shape == (1, 2, 2)
    torch.testing.assert_close(scored.patch_scores.flatten(), expected, atol=1e-3, rtol=1e-3)
    assert scored.patch_scores.min() > 0  # image 5, which holds exact matches, was not searched


def test_patch_score_averages_kappa_nearest_and_k_is_capped():
    model, _, patch_bank = synthetic_spade(image_neighbors=100, patch_neighbors=3)
    patches = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    scored = model._score(SpadeFeatures(pooled=torch.zeros(1, 4), patches=patches))
    gallery = patch_bank.float().reshape(-1, 3)  # all 6 images: K capped at the training set
    distances = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 3), gallery)
    expected = distances.topk(3, dim=1, largest=False).values.mean(dim=1)
    torch.testing.assert_close(scored.patch_scores.flatten(), expected, atol=1e-3, rtol=1e-3)


def test_fit_stores_compact_banks_and_round_trips(tmp_path):
    model = Spade(image_size=64, image_neighbors=3, batch_size=4).fit(random_images(0, 6))
    channels = [info.channels for info in model.backbone_.tap_info(model.taps_)]
    assert model.pooled_bank_.shape == (5, channels[-1])  # one image held out for calibration
    assert model.patch_bank_.shape == (5, 8, 8, sum(channels)) and model.patch_bank_.dtype == PATCH_BANK_DTYPE
    model.save(tmp_path / "model")
    loaded = flawmap.load(tmp_path / "model")
    assert isinstance(loaded, Spade)
    assert_same_predictions(model, loaded, random_images(1, 2), rel=0)


@pytest.mark.parametrize("params", [{"image_neighbors": 0}, {"patch_neighbors": 0}])
def test_rejects_bad_parameters(params):
    with pytest.raises(FlawmapError):
        Spade(**params).fit(random_images(0, 3))
