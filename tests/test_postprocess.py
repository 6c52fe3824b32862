import numpy as np
import pytest
import torch
from scipy import ndimage

from flawmap import postprocess


def test_gaussian_blur_matches_scipy_in_the_interior():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 64, 64, generator=generator)
    blurred = postprocess.gaussian_blur(maps, sigma=2.0)
    expected = ndimage.gaussian_filter(maps.numpy()[0], sigma=2.0, truncate=4.0, mode="mirror")
    np.testing.assert_allclose(blurred[0].numpy(), expected, atol=1e-5)


def test_gaussian_blur_preserves_mass_of_constant_and_zero_sigma():
    maps = torch.full((1, 40, 30), 3.0)
    torch.testing.assert_close(postprocess.gaussian_blur(maps, 4.0), maps)
    assert postprocess.gaussian_blur(maps, 0.0) is maps


def test_anomaly_maps_shape_and_location():
    patch_scores = torch.zeros(1, 8, 8)
    patch_scores[0, 2, 5] = 1.0
    maps = postprocess.anomaly_maps(patch_scores, 64, sigma=4.0)
    assert maps.shape == (1, 64, 64)
    peak_y, peak_x = np.unravel_index(int(maps[0].argmax()), (64, 64))
    # patch (2, 5) covers input pixels y 16..23, x 40..47
    assert 16 <= peak_y <= 23 and 40 <= peak_x <= 47


def test_to_original_size():
    anomaly_map = torch.rand(32, 32)
    resized = postprocess.to_original_size(anomaly_map, (50, 70))
    assert resized.shape == (50, 70) and resized.dtype == np.float32
    assert np.array_equal(postprocess.to_original_size(anomaly_map, (32, 32)), anomaly_map.numpy())


def test_normal_quantile_threshold():
    scores = np.arange(1.0, 101.0)
    assert postprocess.normal_quantile_threshold(scores, 0.0) == 100.0
    assert postprocess.normal_quantile_threshold(scores, 0.05) == 96.0
    assert (scores > postprocess.normal_quantile_threshold(scores, 0.05)).mean() <= 0.05
    with pytest.raises(ValueError):
        postprocess.normal_quantile_threshold(np.array([]), 0.1)
