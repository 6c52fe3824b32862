import pytest
import torch
from conftest import fit_whole_and_in_halves, assert_same_predictions, random_images

from flawmap.backbones import create_backbone
from flawmap.errors import FlawmapError
from flawmap.models.spade import PATCH_BANK_DTYPE, Spade, SpadeFeatures, SpadeScorer
from flawmap.search import all_vectors, build_search


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0")


def synthetic_scorer(backbone, image_neighbors: int, patch_neighbors: int = 1) -> tuple[SpadeScorer, torch.Tensor]:
    """A scorer over hand-made training features: 6 images of 2 x 2 patches with 3 channels.

    Pooled features are points on a line (image i at x = i), so the nearest images of a query
    at x = 0.2 are 0, 1, 2, ... in order. Returns the scorer and the patch features (6, 2, 2, 3).
    """
    pooled_bank = torch.zeros(6, 4)
    pooled_bank[:, 0] = torch.arange(6.0)
    patch_bank = torch.randn(6, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    scorer = SpadeScorer(backbone, backbone.default_taps, image_neighbors, patch_neighbors)
    scorer.image_search = build_search(pooled_bank)
    scorer.patch_search = build_search(patch_bank.reshape(-1, 3), storage_dtype=PATCH_BANK_DTYPE)  # row i * 4 + p
    return scorer, patch_bank


def test_image_score_is_mean_distance_to_the_k_nearest_images(backbone):
    scorer, _ = synthetic_scorer(backbone, image_neighbors=3)
    pooled = torch.tensor([[0.2, 0.0, 0.0, 0.0], [4.6, 0.0, 0.0, 0.0]])
    scored = scorer.score(SpadeFeatures(pooled=pooled, patches=torch.zeros(2, 3, 2, 2)))
    # nearest images: 0, 1, 2 at distances 0.2, 0.8, 1.8; and 5, 4, 3 at 0.4, 0.6, 1.6
    torch.testing.assert_close(scored.image_scores, torch.tensor([2.8 / 3, 2.6 / 3]))


def test_patches_are_matched_only_within_the_nearest_images(backbone):
    scorer, patch_bank = synthetic_scorer(backbone, image_neighbors=2)
    # The first test image's patches are copies of image 5's, but its pooled feature is nearest
    # images 0 and 1; the second one's are copies of image 0's and its nearest images are 4 and 5.
    patches = patch_bank[[5, 0]].permute(0, 3, 1, 2)  # (2, 3, 2, 2)
    pooled = torch.tensor([[0.1, 0.0, 0.0, 0.0], [4.9, 0.0, 0.0, 0.0]])
    scored = scorer.score(SpadeFeatures(pooled=pooled, patches=patches))
    assert scored.patch_scores.shape == (2, 2, 2)
    for image, gallery_images in enumerate([[0, 1], [4, 5]]):
        gallery = patch_bank[gallery_images].reshape(-1, 3)
        expected = torch.cdist(patches[image].permute(1, 2, 0).reshape(-1, 3), gallery).min(dim=1).values
        torch.testing.assert_close(scored.patch_scores[image].flatten(), expected, atol=1e-3, rtol=1e-3)
    assert scored.patch_scores.min() > 0.01  # the images holding exact matches were not searched


def test_patch_score_averages_kappa_nearest_and_k_is_capped(backbone):
    scorer, patch_bank = synthetic_scorer(backbone, image_neighbors=100, patch_neighbors=3)
    patches = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    scored = scorer.score(SpadeFeatures(pooled=torch.zeros(1, 4), patches=patches))
    gallery = patch_bank.reshape(-1, 3)  # all 6 images: K capped at the training set
    distances = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 3), gallery)
    expected = distances.topk(3, dim=1, largest=False).values.mean(dim=1)
    torch.testing.assert_close(scored.patch_scores.flatten(), expected, atol=1e-3, rtol=1e-3)


def quick_spade() -> Spade:
    return Spade(image_size=64, image_neighbors=3).set_runtime(batch_size=4)


def test_fit_indexes_pooled_features_and_every_patch_in_float16():
    model = quick_spade().fit(random_images(0, 6))
    channels = [info.channels for info in model.scorer_.backbone.tap_info(model.taps_)]
    image_search, patch_search = model.scorer_.image_search, model.scorer_.patch_search
    assert model.n_train_images_ == 6  # cross-fitted calibration: nothing held out
    assert all_vectors(image_search).shape == (6, channels[-1])
    assert all_vectors(patch_search).shape == (6 * 8 * 8, sum(channels))
    assert {tensor.dtype for tensor in patch_search.state()[1].values()} >= {PATCH_BANK_DTYPE}


@pytest.mark.parametrize("through_save", [False, True])
def test_partial_fit_on_the_second_half_equals_one_fit_on_all(through_save, tmp_path):
    full, updated = fit_whole_and_in_halves(quick_spade, random_images(2, 10), through_save, tmp_path)
    assert updated.n_train_images_ == 10  # cross-fitted calibration: nothing held out
    for name in ("image_search", "patch_search"):
        full_search, updated_search = getattr(full.scorer_, name), getattr(updated.scorer_, name)
        assert len(updated_search) == len(full_search)
        expected = all_vectors(full_search)
        # same rows in the same order; float16 patch rows are re-rounded around the new mean
        tolerance = 2.0**-10 * float(expected.abs().max())
        torch.testing.assert_close(all_vectors(updated_search), expected, rtol=0, atol=tolerance)
    assert_same_predictions(full, updated, random_images(1, 2), rel=1e-3)


@pytest.mark.parametrize("params", [{"image_neighbors": 0}, {"patch_neighbors": 0}])
def test_rejects_bad_parameters(params):
    with pytest.raises(FlawmapError):
        Spade(**params).fit(random_images(0, 3))
