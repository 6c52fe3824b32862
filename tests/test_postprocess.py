import numpy as np
import pytest
import torch

from flawmap import postprocess


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
