import math

import numpy as np
import pytest

from flawmap.regions import FOUND_SHARE, Region, RegionTally, find_regions


def two_region_map() -> np.ndarray:
    anomaly_map = np.zeros((20, 30), dtype=np.float32)
    anomaly_map[2:5, 3:9] = 2.0
    anomaly_map[3, 4] = 5.0
    anomaly_map[10:18, 20:22] = 3.0
    anomaly_map[19, 0] = 0.5  # below the threshold
    return anomaly_map


def test_regions_are_connected_components_above_the_threshold():
    regions = find_regions(two_region_map(), threshold=1.0)
    assert regions == [
        Region(box=(3, 2, 9, 5), area_px=18, peak_score=5.0, mean_score=pytest.approx((17 * 2.0 + 5.0) / 18)),
        Region(box=(20, 10, 22, 18), area_px=16, peak_score=3.0, mean_score=3.0),
    ]
    assert regions[1].to_json() == {"box": [20, 10, 22, 18], "area_px": 16, "peak_score": 3.0, "mean_score": 3.0}
    assert find_regions(two_region_map(), threshold=10.0) == []


def test_corner_neighbours_are_one_region():
    anomaly_map = np.zeros((4, 4), dtype=np.float32)
    anomaly_map[0, 0] = anomaly_map[1, 1] = 1.0
    assert [region.area_px for region in find_regions(anomaly_map, 0.5)] == [2]


def test_tally_on_hand_made_maps():
    """Image 1: two defects, one covered at 50% (found), one at 25% (< FOUND_SHARE: missed), and
    the image flagged; image 2: good, two false regions, not flagged (disagreement); image 3:
    good, clean, flagged (disagreement)."""
    assert 0.25 < FOUND_SHARE <= 0.5
    tally = RegionTally(threshold=1.0)
    mask = np.zeros((10, 20), dtype=bool)
    mask[0:2, 0:4] = True  # 8 px, 4 covered
    mask[6:8, 10:14] = True  # 8 px, 2 covered
    anomaly_map = np.zeros((10, 20), dtype=np.float32)
    anomaly_map[0:2, 0:2] = 3.0
    anomaly_map[6, 10:12] = 2.0
    tally.add(anomaly_map, mask, flagged=True)
    good_map = np.zeros((10, 20), dtype=np.float32)
    good_map[0, 0] = good_map[9, 19] = 2.0
    tally.add(good_map, np.zeros((10, 20), dtype=bool), flagged=False)
    tally.add(np.zeros((10, 20), dtype=np.float32), None, flagged=True)
    assert tally.result() == {
        "region_recall": 0.5,
        "false_regions_per_good_image": 1.0,
        "verdict_region_disagreement": pytest.approx(2 / 3),
    }


def test_tally_without_defects_or_good_images_is_nan():
    tally = RegionTally(threshold=1.0)
    tally.add(np.zeros((4, 4), dtype=np.float32), None, flagged=False)
    result = tally.result()
    assert math.isnan(result["region_recall"]) and result["false_regions_per_good_image"] == 0.0
