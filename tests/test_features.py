import pytest
import torch

from flawmap.features import channel_statistics, flatten_patches, fuse_levels, local_average


def test_local_average_interior_and_border():
    feature_map = torch.arange(16.0).view(1, 1, 4, 4)
    averaged = local_average(feature_map, 3)
    assert averaged.shape == feature_map.shape
    # interior position (1, 1): mean of rows 0-2, cols 0-2
    assert averaged[0, 0, 1, 1] == feature_map[0, 0, 0:3, 0:3].mean()
    # corner (0, 0) and edge (0, 1): the zero padding counts, so 4 and 6 real neighbours over 9
    assert averaged[0, 0, 0, 0] == feature_map[0, 0, 0:2, 0:2].sum() / 9
    assert averaged[0, 0, 0, 1] == feature_map[0, 0, 0:2, 0:3].sum() / 9
    assert torch.equal(local_average(feature_map, 1), feature_map)


def test_fuse_levels_upsamples_to_finest_grid():
    fine = torch.randn(2, 3, 8, 8)
    coarse = torch.ones(2, 5, 4, 4) * 7.0
    fused = fuse_levels([fine, coarse])
    assert fused.shape == (2, 8, 8, 8)
    assert torch.equal(fused[:, :3], fine)
    torch.testing.assert_close(fused[:, 3:], torch.full((2, 5, 8, 8), 7.0))


def test_flatten_patches_order():
    patch_features = torch.randn(2, 4, 3, 5)
    rows = flatten_patches(patch_features)
    assert rows.shape == (2 * 3 * 5, 4)
    # row index = image * h * w + y * w + x
    assert torch.equal(rows[1 * 15 + 2 * 5 + 3], patch_features[1, :, 2, 3])


def test_channel_statistics_over_images_and_positions():
    maps = torch.stack([torch.full((2, 3, 3), 1.0), torch.full((2, 3, 3), 3.0)])  # (2, 2, 3, 3)
    maps[:, 1] = 5.0  # a constant channel: std floored
    mean, std = channel_statistics(maps, min_std=1e-3)
    assert mean.tolist() == [2.0, 5.0] and std[1].item() == 1e-3
    assert std[0].item() == pytest.approx((18 / 17) ** 0.5)  # unbiased std of nine 1s and nine 3s

