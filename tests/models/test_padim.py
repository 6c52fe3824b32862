import numpy as np
import pytest
import torch
from conftest import fit_whole_and_in_halves, assert_same_predictions, random_images
from scipy.spatial.distance import mahalanobis

import flawmap
from flawmap.errors import FlawmapError
from flawmap.io import read_tensor_file
from flawmap.models.padim import (
    GaussianAccumulator, Padim, left_out_distances, left_out_factors, mahalanobis_distances, regularised_inverse,
)


def correlated_samples(rng: np.random.Generator, n_samples: int, n_positions: int, n_dims: int) -> np.ndarray:
    """(n_samples, n_positions, n_dims) draws of a different correlated Gaussian per position."""
    mixing = rng.normal(size=(n_positions, n_dims, n_dims))
    offsets = rng.normal(scale=5.0, size=(n_positions, n_dims))
    return np.einsum("spd,pde->spe", rng.normal(size=(n_samples, n_positions, n_dims)), mixing) + offsets


def quick_padim(**params) -> Padim:
    return Padim(image_size=64, n_features=24, **params).set_runtime(batch_size=4)


def test_streamed_mean_and_covariance_match_numpy():
    samples = correlated_samples(np.random.default_rng(0), 37, 4, 6)
    gaussians, later = GaussianAccumulator(), GaussianAccumulator()
    for batch in np.array_split(samples, [1, 16])[:2]:  # uneven batches, one of a single sample
        gaussians.add(torch.from_numpy(batch))
    for batch in np.array_split(samples[16:], [14]):  # a second stream, then merged
        later.add(torch.from_numpy(batch))
    gaussians.update(later)
    assert gaussians.count == 37
    for position in range(4):
        np.testing.assert_allclose(gaussians.mean()[position].numpy(), samples[:, position].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(gaussians.covariance()[position].numpy(), np.cov(samples[:, position].T), rtol=1e-10)


def test_accumulator_state_keeps_half_of_the_symmetric_outer_sums():
    gaussians = GaussianAccumulator()
    gaussians.add(torch.from_numpy(correlated_samples(np.random.default_rng(3), 9, 2, 5)))
    state = gaussians.state()
    assert state["outer_sums_upper"].shape == (2, 5 * 6 // 2) and int(state["count"]) == 9
    restored = GaussianAccumulator.from_state(state)
    assert torch.equal(restored.covariance(), gaussians.covariance())
    assert torch.equal(restored.covariance(), restored.covariance().transpose(1, 2))


def test_covariance_needs_two_observations():
    gaussians = GaussianAccumulator()
    gaussians.add(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError):
        gaussians.covariance()


def test_mahalanobis_distances_match_scipy():
    rng = np.random.default_rng(1)
    training = correlated_samples(rng, 60, 3, 5)
    gaussians = GaussianAccumulator()
    gaussians.add(torch.from_numpy(training))
    epsilon = 0.01
    inverse_covariances = regularised_inverse(gaussians.covariance(), epsilon)
    queries = correlated_samples(rng, 4, 3, 5)
    distances = mahalanobis_distances(torch.from_numpy(queries), gaussians.mean(), inverse_covariances)
    assert distances.shape == (4, 3)
    for position in range(3):
        inverse = np.linalg.inv(np.cov(training[:, position].T) + epsilon * np.eye(5))
        mean = training[:, position].mean(axis=0)
        for image in range(4):
            expected = mahalanobis(queries[image, position], mean, inverse)
            assert distances[image, position].item() == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def fitted_padim() -> Padim:
    return quick_padim().fit(random_images(0, 6))


def test_fit_keeps_a_sorted_random_channel_subset(fitted_padim):
    scorer = fitted_padim.scorer_
    assert scorer.channel_indices.shape == (24,) and torch.equal(scorer.channel_indices, scorer.channel_indices.sort().values)
    assert scorer.means.shape == (64, 24)  # 8 x 8 positions at image size 64
    assert scorer.inverse_covariances.shape == (64, 24, 24)
    assert scorer.inverse_covariances.dtype == torch.float32


def test_model_file_holds_moments_and_loading_derives_identical_gaussians(fitted_padim, tmp_path):
    directory = fitted_padim.save(tmp_path / "model")
    (model_file,) = directory.glob("model-*.safetensors")
    assert set(read_tensor_file(model_file)) == {"channel_indices", "moments.count", "moments.sums", "moments.outer_sums_upper"}
    loaded = flawmap.load(directory)
    for name in ("channel_indices", "means", "inverse_covariances"):
        assert torch.equal(getattr(loaded.scorer_, name), getattr(fitted_padim.scorer_, name)), name


def test_too_many_features_keep_every_channel():
    model = Padim(image_size=32, n_features=10_000).set_runtime(batch_size=4).fit(random_images(2, 4))
    n_channels = sum(info.channels for info in model.scorer_.backbone.tap_info(model.taps_))
    assert torch.equal(model.scorer_.channel_indices, torch.arange(n_channels))


@pytest.mark.parametrize("through_save", [False, True])
def test_partial_fit_on_the_second_half_equals_one_fit_on_all(through_save, tmp_path):
    # batches of 5: both fits embed the same two batches, so their features agree bit for bit
    # (multi-threaded convolutions round differently for other batch compositions, and the
    # inverses below amplify such differences)
    full, updated = fit_whole_and_in_halves(
        lambda: quick_padim().set_runtime(batch_size=5), random_images(2, 10), through_save, tmp_path
    )
    assert updated.n_train_images_ == 10 and updated.gaussians_.count == 10  # cross-fitted: nothing held out
    assert torch.equal(updated.scorer_.channel_indices, full.scorer_.channel_indices)
    # float32 backbone features differ in the last bits between batch compositions
    torch.testing.assert_close(updated.scorer_.means, full.scorer_.means, rtol=1e-5, atol=1e-5)
    # the moments agree to float32 feature noise; the inverses (of 10 samples in 24 dimensions,
    # so conditioned by epsilon alone) amplify that noise, so they are compared through the moments
    for name, tensor in full.gaussians_.state().items():
        scale = float(tensor.double().abs().max())
        torch.testing.assert_close(updated.gaussians_.state()[name], tensor, rtol=1e-6, atol=1e-6 * scale)
    # the first half's left-out scores were computed against its own 5-image Gaussians, so the
    # thresholds differ; the second half's are those of the full model (up to the inverses' noise)
    assert len(updated.calibration_scores_) == len(full.calibration_scores_) == 10
    assert updated.calibration_scores_[5:] == pytest.approx(full.calibration_scores_[5:], rel=0.1)
    assert_same_predictions(full, updated, random_images(1, 2))


@pytest.mark.parametrize(("n_samples", "epsilon"), [(12, 1e-9), (12, 0.5), (6, 0.01)], ids=["n>d", "n>d-eps", "n<=d"])
def test_left_out_distances_equal_gaussians_refitted_without_each_sample(n_samples, epsilon):
    """The closed form (Sherman-Morrison) against explicit leave-one-out refits with the same
    epsilon, also with fewer samples than dimensions, from float32 samples as PaDiM's features are."""
    samples = torch.from_numpy(correlated_samples(np.random.default_rng(0), n_samples, 3, 8)).float()  # N, P, D
    full = GaussianAccumulator()
    full.add(samples)
    left_out = left_out_distances(samples, full, left_out_factors(full, epsilon))
    for i in range(n_samples):
        others = GaussianAccumulator()
        others.add(torch.cat([samples[:i], samples[i + 1 :]]))
        refit = mahalanobis_distances(samples[i : i + 1], others.mean(), regularised_inverse(others.covariance(), epsilon))
        torch.testing.assert_close(left_out[i : i + 1], refit, rtol=1e-7, atol=0)


@pytest.mark.parametrize("params", [{"n_features": 0}, {"epsilon": 0.0}])
def test_rejects_bad_parameters(params):
    with pytest.raises(FlawmapError):
        Padim(**params).fit(random_images(0, 3))


@pytest.mark.parametrize("epsilon", [0.01, 1e-4])
def test_calibration_scores_are_those_of_models_refitted_without_each_image(epsilon):
    """Fewer images (6) than features (24): each training image's calibration score is the score
    of a PaDiM fitted on the other five (float32 scores and maps: rtol 1e-4)."""
    images = random_images(0, 6)
    model = quick_padim(epsilon=epsilon).set_runtime(precision="float32").fit(images)
    refitted = [
        quick_padim(epsilon=epsilon).set_runtime(precision="float32").fit(images[:i] + images[i + 1 :]).predict([images[i]])[0].score
        for i in range(len(images))
    ]
    np.testing.assert_allclose(model.calibration_scores_, refitted, rtol=1e-4)
