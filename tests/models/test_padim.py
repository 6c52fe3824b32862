import numpy as np
import pytest
import torch
from conftest import assert_same_predictions, random_images
from scipy.spatial.distance import mahalanobis

import flawmap
from flawmap.errors import FlawmapError
from flawmap.models.padim import GaussianAccumulator, Padim, mahalanobis_distances, regularised_inverse


def correlated_samples(rng: np.random.Generator, n_samples: int, n_positions: int, n_dims: int) -> np.ndarray:
    """(n_samples, n_positions, n_dims) draws of a different correlated Gaussian per position."""
    mixing = rng.normal(size=(n_positions, n_dims, n_dims))
    offsets = rng.normal(scale=5.0, size=(n_positions, n_dims))
    return np.einsum("spd,pde->spe", rng.normal(size=(n_samples, n_positions, n_dims)), mixing) + offsets


def test_streamed_mean_and_covariance_match_numpy():
    samples = correlated_samples(np.random.default_rng(0), 37, 4, 6)
    gaussians = GaussianAccumulator()
    for batch in np.array_split(samples, [1, 16, 30]):  # uneven batches, one of a single sample
        gaussians.add(torch.from_numpy(batch))
    assert gaussians.count == 37
    for position in range(4):
        np.testing.assert_allclose(gaussians.mean()[position].numpy(), samples[:, position].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(gaussians.covariance()[position].numpy(), np.cov(samples[:, position].T), rtol=1e-10)


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
    return Padim(image_size=64, n_features=24, batch_size=4).fit(random_images(0, 6))


def test_fit_keeps_a_sorted_random_channel_subset(fitted_padim):
    indices = fitted_padim.channel_indices_
    assert indices.shape == (24,) and torch.equal(indices, indices.sort().values)
    assert fitted_padim.means_.shape == (64, 24)  # 8 x 8 positions at image size 64
    assert fitted_padim.inverse_covariances_.shape == (64, 24, 24)
    assert fitted_padim.inverse_covariances_.dtype == torch.float32


def test_save_load_round_trip(fitted_padim, tmp_path):
    fitted_padim.save(tmp_path / "model")
    loaded = flawmap.load(tmp_path / "model")
    assert isinstance(loaded, Padim) and torch.equal(loaded.channel_indices_, fitted_padim.channel_indices_)
    assert_same_predictions(fitted_padim, loaded, random_images(1, 2), rel=0)


def test_too_many_features_keep_every_channel():
    model = Padim(image_size=32, n_features=10_000, batch_size=4).fit(random_images(2, 4))
    n_channels = sum(info.channels for info in model.backbone_.tap_info(model.taps_))
    assert torch.equal(model.channel_indices_, torch.arange(n_channels))


@pytest.mark.parametrize("params", [{"n_features": 0}, {"epsilon": 0.0}])
def test_rejects_bad_parameters(params):
    with pytest.raises(FlawmapError):
        Padim(**params).fit(random_images(0, 3))
