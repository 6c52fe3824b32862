import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from flawmap.errors import FlawmapError
from flawmap.postprocessor import PostProcessor


def reference_maps(patch_scores: torch.Tensor, size: int, sigma: float) -> np.ndarray:
    """Bilinear upsampling (align_corners=False), then SciPy's Gaussian with mirrored borders."""
    upsampled = F.interpolate(patch_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    planes = upsampled.squeeze(1).double().numpy()
    if sigma == 0:
        return planes
    return ndimage.gaussian_filter(planes, sigma=(0, sigma, sigma), truncate=4.0, mode="mirror")


@pytest.mark.parametrize(
    ("grid_hw", "size", "sigma"),
    [((8, 8), 64, 4.0), ((32, 32), 256, 4.0), ((6, 10), 48, 2.0), ((64, 64), 64, 4.0), ((3, 3), 7, 4.0), ((8, 8), 64, 0.0)],
)
def test_maps_are_upsampling_then_mirrored_gaussian_smoothing(grid_hw, size, sigma):
    """Equal to interpolate + scipy.ndimage.gaussian_filter(mode="mirror"), also where the blur
    radius (16 px) exceeds the map (7 px) and the border reflects several times."""
    patch_scores = torch.rand(2, *grid_hw, generator=torch.Generator().manual_seed(0))
    maps, scores = PostProcessor(size, sigma)(patch_scores)
    assert maps.shape == (2, size, size) and maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), reference_maps(patch_scores, size, sigma), atol=1e-6)
    torch.testing.assert_close(scores, maps.amax(dim=(1, 2)))


def test_the_scorers_image_scores_are_kept():
    image_scores = torch.tensor([3.0, -1.0], dtype=torch.float64)
    _, scores = PostProcessor(32, 4.0)(torch.rand(2, 4, 4), image_scores)
    assert scores.dtype == torch.float32 and scores.tolist() == [3.0, -1.0]


def test_a_hot_patch_peaks_where_it_covers_the_input():
    patch_scores = torch.zeros(1, 8, 8)
    patch_scores[0, 2, 5] = 1.0
    maps, _ = PostProcessor(64, 4.0)(patch_scores)
    peak_y, peak_x = np.unravel_index(int(maps[0].argmax()), (64, 64))
    assert 16 <= peak_y <= 23 and 40 <= peak_x <= 47  # patch (2, 5) covers input pixels y 16..23, x 40..47


def test_constant_scores_stay_constant_and_operators_are_built_once():
    postprocessor = PostProcessor(40, 4.0)
    maps, _ = postprocessor(torch.full((1, 5, 5), 3.0))
    torch.testing.assert_close(maps, torch.full((1, 40, 40), 3.0))
    first = postprocessor.operator(5, torch.device("cpu"))
    postprocessor(torch.rand(3, 5, 5))
    assert postprocessor.operator(5, torch.device("cpu")) is first


def test_invalid_settings_are_rejected():
    with pytest.raises(FlawmapError, match="sigma >= 0"):
        PostProcessor(32, -1.0)
