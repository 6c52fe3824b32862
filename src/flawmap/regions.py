"""Defect regions: where an anomaly map passes the model's pixel threshold.

An image is *anomalous* when its image score passes the image threshold (``threshold_``);
its *regions* are the 8-connected components of the pixels whose map value passes the pixel
threshold (``map_high_``: the level that at most ``false_alarm_rate`` of normal images reach
anywhere, calibrated on out-of-sample normal maps like the image threshold). For methods whose
image score is the map's maximum the two agree up to the two quantiles' estimates; for methods
with an image score of their own (PatchCore's re-weighting, MKD's loss) an image may be flagged
without a region, or show a region while judged normal: the verdict is the image threshold's,
the regions say where to look.

Every consumer (the Python :class:`~flawmap.prediction.Prediction`, ``predict``'s
``scores.jsonl``, ``score``'s Parquet, the server's answer, the overlays and the report) takes
its regions from :func:`find_regions`. This module needs numpy and SciPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: 8-connectivity: pixels touching at a corner belong to one region.
CONNECTIVITY = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    """One connected region of an anomaly map above the pixel threshold.

    Attributes
    ----------
    box : (int, int, int, int)
        ``(x0, y0, x1, y1)`` in pixels of the map, end exclusive.
    area_px : int
        Pixels in the region.
    peak_score, mean_score : float
        Largest and mean map value over the region.
    """

    box: tuple[int, int, int, int]
    area_px: int
    peak_score: float
    mean_score: float

    def to_json(self) -> dict[str, Any]:
        """``{"box": [x0, y0, x1, y1], "area_px", "peak_score", "mean_score"}``."""
        return {"box": list(self.box), "area_px": self.area_px, "peak_score": self.peak_score, "mean_score": self.mean_score}


def find_regions(anomaly_map: np.ndarray, threshold: float) -> list[Region]:
    """The 8-connected regions of ``anomaly_map`` (H x W) strictly above ``threshold``, highest
    peak first."""
    labels, n_regions = region_labels(anomaly_map, threshold)
    if n_regions == 0:
        return []
    index = np.arange(1, n_regions + 1)
    peaks = ndimage.maximum(anomaly_map, labels, index)
    means = ndimage.mean(anomaly_map, labels, index)
    areas = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:]
    regions = [
        Region((cols.start, rows.start, cols.stop, rows.stop), int(area), float(peak), float(mean))
        for (rows, cols), peak, mean, area in zip(ndimage.find_objects(labels), peaks, means, areas)
    ]
    return sorted(regions, key=lambda region: -region.peak_score)


def region_labels(anomaly_map: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Labels (H x W, 0 = background) of the regions of :func:`find_regions` and their count."""
    return ndimage.label(anomaly_map > threshold, structure=CONNECTIVITY)


#: A ground-truth defect region counts as found when predicted regions cover at least this share
#: of its pixels (an inspector shown the outlined regions sees the defect; a share rather than a
#: single pixel, so that one region bleeding into a large defect's edge does not count).
FOUND_SHARE = 0.3


class RegionTally:
    """Region metrics streamed over an evaluation, one image at a time, at a pixel threshold:

    - ``region_recall``: the share of ground-truth defect regions (8-connected components of the
      masks of every test image) that predicted regions cover by at least :data:`FOUND_SHARE`;
    - ``false_regions_per_good_image``: predicted regions per normal test image (every one of
      them is a false alarm);
    - ``verdict_region_disagreement``: the share of test images whose verdict (image threshold)
      and regions (pixel threshold) disagree: flagged without a region, or a region while judged
      normal.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.defects = self.found = 0
        self.good_images = self.good_image_regions = 0
        self.images = self.disagreements = 0

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray | None, flagged: bool) -> None:
        """One test image: its map and ground-truth mask (H x W; None or empty for a normal
        image) and whether its image score was flagged."""
        labels, n_regions = region_labels(anomaly_map, self.threshold)
        self.images += 1
        self.disagreements += int(flagged != (n_regions > 0))
        if mask is None or not mask.any():
            self.good_images += 1
            self.good_image_regions += n_regions
            return
        defects, n_defects = ndimage.label(mask, structure=CONNECTIVITY)
        covered = np.bincount(defects[labels > 0], minlength=n_defects + 1)[1:]
        sizes = np.bincount(defects.ravel(), minlength=n_defects + 1)[1:]
        self.defects += n_defects
        self.found += int((covered >= FOUND_SHARE * sizes).sum())

    def result(self) -> dict[str, float]:
        """The three metrics (NaN where the test split has no image of the kind they need)."""
        return {
            "region_recall": self.found / self.defects if self.defects else float("nan"),
            "false_regions_per_good_image": self.good_image_regions / self.good_images if self.good_images else float("nan"),
            "verdict_region_disagreement": self.disagreements / self.images if self.images else float("nan"),
        }
