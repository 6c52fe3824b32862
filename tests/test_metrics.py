"""Tests for flawmap.metrics: against scikit-learn, brute force, hand computation and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from flawmap.errors import FlawmapError
from flawmap.metrics import (
    DEFAULT_MAX_BINS,
    StreamingPixelMetrics,
    aupro,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
    pixel_metrics,
)

SEEDS = [0, 1, 2, 3, 4]


def random_scores_and_labels(
    seed: int, n_samples: int, decimals: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores mildly correlated with random labels; rounded to ``decimals`` for heavy ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n_samples) < 0.3
    labels[:2] = [True, False]
    scores = rng.random(n_samples) + 0.3 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores.astype(np.float32), labels


def random_blob_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Blobs of varied sizes, from smoothed noise; forced to hold both classes."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.0)
    mask = noise > np.quantile(noise, rng.uniform(0.7, 0.95))
    mask[0, 0], mask[-1, -1] = True, False
    return mask


def random_maps_and_masks(seed: int, n_images: int, max_side: int) -> tuple[list, list]:
    """Maps of varied shapes that score regions somewhat higher, with ties (one decimal)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n_images):
        shape = (int(rng.integers(4, max_side)), int(rng.integers(4, max_side)))
        mask = random_blob_mask(rng, shape)
        maps.append(np.round(rng.random(shape) + 0.4 * mask, 1).astype(np.float32))
        masks.append(mask)
    return maps, masks


def reference_aupro(maps: list, masks: list, fpr_limit: float) -> float:
    """AUPRO straight from the definition: PRO and FPR at every distinct threshold, one at a time."""
    region_scores = []
    for anomaly_map, mask in zip(maps, masks):
        regions, n_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        region_scores += [anomaly_map[regions == region] for region in range(1, n_regions + 1)]
    normal_scores = np.concatenate([anomaly_map[~mask] for anomaly_map, mask in zip(maps, masks)])
    thresholds = np.unique(np.concatenate([anomaly_map.ravel() for anomaly_map in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for threshold in thresholds:
        fprs.append(np.mean(normal_scores >= threshold))
        pros.append(np.mean([np.mean(scores >= threshold) for scores in region_scores]))
    area = 0.0
    for (fpr_a, pro_a), (fpr_b, pro_b) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if fpr_b <= fpr_limit:
            area += trapezoid([pro_a, pro_b], [fpr_a, fpr_b])
        elif fpr_a < fpr_limit:
            pro_at_limit = pro_a + (pro_b - pro_a) * (fpr_limit - fpr_a) / (fpr_b - fpr_a)
            area += trapezoid([pro_a, pro_at_limit], [fpr_a, fpr_limit])
    return area / fpr_limit


# --- auroc and average_precision -------------------------------------------------------------


def assert_auroc_and_average_precision_equal_sklearn(scores: np.ndarray, labels: np.ndarray) -> None:
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), rel=1e-12
    )


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_average_precision_equal_sklearn(seed: int, decimals: int | None) -> None:
    scores, labels = random_scores_and_labels(seed, n_samples=2000, decimals=decimals)
    assert_auroc_and_average_precision_equal_sklearn(scores, labels)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_average_precision_equal_sklearn_on_integer_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.r_[0, 1, rng.integers(0, 2, size=300)]
    scores = rng.integers(0, 5, size=labels.size)
    assert_auroc_and_average_precision_equal_sklearn(scores, labels)


def test_auroc_small_case_by_hand() -> None:
    # Pairs (anomalous, normal): (0.5, 0.1) win, (0.5, 0.5) tie = 1/2, (0.9, *) both win.
    # AUROC = (1 + 0.5 + 2) / 4 = 0.875.
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    labels = np.array([0, 0, 1, 1])
    assert auroc(scores, labels) == 0.875


@pytest.mark.parametrize(
    ("scores", "expected_auroc"),
    [
        (np.array([0.1, 0.2, 0.3, 0.8, 0.9]), 1.0),  # every anomalous above every normal
        (np.array([0.8, 0.9, 0.7, 0.1, 0.2]), 0.0),  # every anomalous below every normal
        (np.full(5, 0.5), 0.5),  # all tied
    ],
)
def test_auroc_degenerate_cases(scores: np.ndarray, expected_auroc: float) -> None:
    labels = np.array([False, False, False, True, True])
    assert auroc(scores, labels) == expected_auroc
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_perfect_scores_give_average_precision_one() -> None:
    assert average_precision(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0


@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max, image_metrics])
@pytest.mark.parametrize("labels", [np.zeros(4, dtype=int), np.ones(4, dtype=int)])
def test_one_class_raises(metric, labels: np.ndarray) -> None:
    with pytest.raises(FlawmapError, match="both normal and anomalous"):
        metric(np.array([0.1, 0.2, 0.3, 0.4]), labels)


def test_labels_must_be_binary() -> None:
    with pytest.raises(FlawmapError, match="labels must hold only 0 and 1"):
        auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]))


def test_integer_and_boolean_labels_agree() -> None:
    scores, labels = random_scores_and_labels(0, n_samples=100, decimals=1)
    assert auroc(scores, labels.astype(np.uint8)) == auroc(scores, labels)


def test_nan_scores_raise() -> None:
    with pytest.raises(FlawmapError, match="NaN"):
        auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(FlawmapError, match="shape"):
        auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))


# --- f1_max ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_equals_brute_force(seed: int, decimals: int | None) -> None:
    scores, labels = random_scores_and_labels(seed, n_samples=60, decimals=decimals)
    brute_force_best = max(f1_score(labels, scores >= threshold) for threshold in np.unique(scores))
    best_f1, threshold = f1_max(scores, labels)
    assert best_f1 == pytest.approx(brute_force_best, rel=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best_f1, rel=1e-12)
    assert threshold in scores


def test_f1_max_by_hand() -> None:
    # Threshold 0.8: TP 1, FP 0, FN 1 -> F1 = 2/3.  Threshold 0.6: TP 2, FP 1 -> F1 = 4/5.
    # Threshold 0.3: TP 2, FP 2 -> F1 = 2/3.  The best is 0.8 at threshold 0.6.
    scores = np.array([0.3, 0.6, 0.7, 0.8])
    labels = np.array([0, 1, 0, 1])
    assert f1_max(scores, labels) == pytest.approx((0.8, 0.6))


# --- aupro ----------------------------------------------------------------------------------


def test_aupro_one_region_by_hand() -> None:
    # 4x4 image, one region of 2 pixels (scores 0.9, 0.5); 14 normal pixels: 0.7, 0.4, twelve 0.1.
    # Curve (FPR, PRO): t=0.9 (0, 1/2); t=0.7 (1/14, 1/2); t=0.5 (1/14, 1); t=0.4 (2/14, 1);
    # t=0.1 (1, 1). Area over [0, 0.3] = 1/2 * 1/14 + 1 * (0.3 - 1/14) = 0.3 - 1/28.
    # AUPRO = (0.3 - 1/28) / 0.3 = 37/42.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True
    anomaly_map = np.full((4, 4), 0.1)
    anomaly_map[0, :2] = [0.9, 0.5]
    anomaly_map[2, 2], anomaly_map[3, 3] = 0.7, 0.4
    assert aupro([anomaly_map], [mask]) == pytest.approx(37 / 42, rel=1e-12)


def test_aupro_averages_over_regions_not_pixels() -> None:
    # 4x4 image; region A = one pixel (0,0) scored 0.9; region B = three pixels in row 3 scored 0.3.
    # Normal pixels: one 0.85, eleven 0.0.
    # Curve: t=0.9 PRO = (1 + 0)/2 = 1/2 at FPR 0; t=0.85 (1/12, 1/2); t=0.3 (1/12, 1); t=0 (1, 1).
    # Area = 1/2 * 1/12 + (0.3 - 1/12) = 0.3 - 1/24; AUPRO = 1 - 1/(24 * 0.3) = 31/36.
    # (A pixel-wise mean would give PRO 1/4 at first and AUPRO 19/24 instead.)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    mask[3, 1:] = True
    anomaly_map = np.zeros((4, 4))
    anomaly_map[0, 0] = 0.9
    anomaly_map[3, 1:] = 0.3
    anomaly_map[1, 2] = 0.85
    assert aupro([anomaly_map], [mask]) == pytest.approx(31 / 36, rel=1e-12)


def test_aupro_interpolates_at_the_fpr_limit() -> None:
    # 2x5 image; region of 2 pixels scored 0.9 and 0.2; 8 normal: two 0.5, four 0.2, two 0.1.
    # Curve: (0, 0) -> t=0.9 (0, 1/2) -> t=0.5 (2/8, 1/2) -> t=0.2 (6/8, 1) -> t=0.1 (1, 1).
    # FPR 0.3 falls inside the segment (0.25, 0.5)-(0.75, 1): PRO(0.3) = 0.5 + 0.5 * 0.05/0.5 = 0.55.
    # Area = 0.5 * 0.25 + (0.5 + 0.55)/2 * 0.05 = 0.15125; AUPRO = 0.15125 / 0.3 = 121/240.
    mask = np.zeros((2, 5), dtype=bool)
    mask[0, :2] = True
    anomaly_map = np.array([[0.9, 0.2, 0.5, 0.5, 0.2], [0.2, 0.2, 0.2, 0.1, 0.1]])
    assert aupro([anomaly_map], [mask]) == pytest.approx(121 / 240, rel=1e-12)


def test_aupro_perfect_map_scores_one() -> None:
    rng = np.random.default_rng(0)
    mask = random_blob_mask(rng, (20, 30))
    anomaly_map = rng.random((20, 30)) + 2.0 * mask  # every anomalous pixel above every normal
    assert aupro([anomaly_map], [mask]) == pytest.approx(1.0, rel=1e-12)


def test_aupro_inverted_map_scores_zero() -> None:
    rng = np.random.default_rng(0)
    mask = random_blob_mask(rng, (20, 30))
    anomaly_map = rng.random((20, 30)) - 2.0 * mask  # PRO stays 0 until FPR reaches 1
    assert aupro([anomaly_map], [mask]) == 0.0


def test_aupro_counts_diagonal_neighbours_as_one_region() -> None:
    # 3x3 image; anomalous (0,0), (1,1), (1,2): one 8-connected region of 3 pixels.
    # (0,0) scores 0.9, the other two 0.0, the six normal pixels 0.5.
    # Curve: t=0.9 (0, 1/3); t=0.5 (1, 1/3); t=0 (1, 1). AUPRO = 1/3.
    # With 4-connectivity there would be regions {(0,0)} and {(1,1), (1,2)}: PRO 1/2, AUPRO 1/2.
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    anomaly_map = np.full((3, 3), 0.5)
    anomaly_map[mask] = [0.9, 0.0, 0.0]
    assert aupro([anomaly_map], [mask]) == pytest.approx(1 / 3, rel=1e-12)


def test_aupro_pools_images_of_different_shapes() -> None:
    # Image 1 (2x2): region R1 = (0,0) scored 0.9; three normal pixels 0.1.
    # Image 2 (1x3): normal pixel 0.2; region R2 = two pixels scored 0.8 and 0.05.
    # Curve: t=0.9 (0, 1/2); t=0.8 (0, (1 + 1/2)/2 = 3/4); t=0.2 (1/4, 3/4); t=0.1 (1, 3/4);
    # t=0.05 (1, 1). Over [0, 0.3] the PRO is 3/4 throughout: AUPRO = 3/4.
    maps = [np.array([[0.9, 0.1], [0.1, 0.1]]), np.array([[0.2, 0.8, 0.05]])]
    masks = [np.array([[1, 0], [0, 0]]), np.array([[0, 1, 1]])]
    assert aupro(maps, masks) == pytest.approx(0.75, rel=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_equals_slow_reference(seed: int, fpr_limit: float) -> None:
    maps, masks = random_maps_and_masks(seed, n_images=3, max_side=16)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(
        reference_aupro(maps, masks, fpr_limit), rel=1e-10
    )


def test_aupro_shape_mismatch_raises() -> None:
    with pytest.raises(FlawmapError, match="map 0 has shape"):
        aupro([np.zeros((4, 4))], [np.zeros((4, 5))])


def test_aupro_without_regions_raises() -> None:
    with pytest.raises(FlawmapError, match="both normal and anomalous pixels"):
        aupro([np.zeros((4, 4))], [np.zeros((4, 4))])


def test_aupro_without_normal_pixels_raises() -> None:
    with pytest.raises(FlawmapError, match="both normal and anomalous pixels"):
        aupro([np.zeros((4, 4))], [np.ones((4, 4))])


@pytest.mark.parametrize("fpr_limit", [0.0, 1.5])
def test_aupro_fpr_limit_out_of_range_raises(fpr_limit: float) -> None:
    mask = np.eye(4, dtype=bool)
    with pytest.raises(FlawmapError, match="fpr_limit"):
        aupro([np.eye(4)], [mask], fpr_limit=fpr_limit)


def test_aupro_maps_and_masks_counts_must_match() -> None:
    with pytest.raises(FlawmapError, match="2 maps but 1 masks"):
        aupro([np.eye(4), np.eye(4)], [np.eye(4)])


# --- pixel_metrics and image_metrics --------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_metrics_equal_the_individual_metrics(seed: int) -> None:
    maps, masks = random_maps_and_masks(seed, n_images=4, max_side=40)
    all_scores = np.concatenate([anomaly_map.ravel() for anomaly_map in maps])
    all_labels = np.concatenate([mask.ravel() for mask in masks])
    assert pixel_metrics(maps, masks) == pytest.approx(
        {
            "pixel_auroc": auroc(all_scores, all_labels),
            "aupro": aupro(maps, masks),
            "pixel_ap": average_precision(all_scores, all_labels),
            "pixel_f1_max": f1_max(all_scores, all_labels)[0],
        },
        rel=1e-12,
    )


def test_image_metrics_equal_the_individual_metrics() -> None:
    scores, labels = random_scores_and_labels(0, n_samples=200, decimals=2)
    assert image_metrics(scores, labels) == pytest.approx(
        {
            "image_auroc": auroc(scores, labels),
            "image_ap": average_precision(scores, labels),
            "image_f1_max": f1_max(scores, labels)[0],
        },
        rel=1e-12,
    )


def test_pixel_metrics_runs_at_full_resolution() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.random((900, 900), dtype=np.float32) for _ in range(20)]
    masks = []
    for _ in range(20):
        mask = np.zeros((900, 900), dtype=bool)
        top, left = rng.integers(0, 800, size=2)
        mask[top : top + 100, left : left + 60] = True
        masks.append(mask)
    metrics = pixel_metrics(maps, masks)
    assert set(metrics) == {"pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_metrics_return_python_floats() -> None:
    maps, masks = random_maps_and_masks(0, n_images=2, max_side=10)
    scores, labels = random_scores_and_labels(0, n_samples=50, decimals=1)
    values = [*pixel_metrics(maps, masks).values(), *image_metrics(scores, labels).values()]
    values += [aupro(maps, masks), auroc(scores, labels), *f1_max(scores, labels)]
    assert all(type(value) is float for value in values)


# --- StreamingPixelMetrics against the exact pixel_metrics ----------------------------------


def stream(maps: list, masks: list, max_bins: int = DEFAULT_MAX_BINS) -> StreamingPixelMetrics:
    metrics = StreamingPixelMetrics(max_bins=max_bins)
    for anomaly_map, mask in zip(maps, masks):
        metrics.add(anomaly_map, mask)
    return metrics


def awkward_maps_and_masks(seed: int) -> tuple[list, list]:
    """Random maps with ties, plus a constant map, an image without defects, one-pixel regions,
    negative scores and both signed zeros."""
    maps, masks = random_maps_and_masks(seed, n_images=4, max_side=30)
    rng = np.random.default_rng(seed)
    maps.append(np.full((12, 9), 0.5, dtype=np.float32))  # constant, with a region
    masks.append(random_blob_mask(rng, (12, 9)))
    maps.append(np.round(rng.random((10, 10)), 1).astype(np.float32))  # no defect at all
    masks.append(np.zeros((10, 10), dtype=bool))
    signed = np.round(rng.normal(size=(9, 11)), 1).astype(np.float32)
    signed[0, :3] = [-0.0, 0.0, -0.0]
    single_pixels = np.zeros((9, 11), dtype=bool)
    single_pixels[0, 1] = single_pixels[4, 4] = single_pixels[8, 0] = True  # one-pixel regions
    maps.append(signed)
    masks.append(single_pixels)
    return maps, masks


@pytest.mark.parametrize("seed", SEEDS)
def test_streamed_pixel_metrics_equal_exact_ones_at_full_resolution(seed: int) -> None:
    maps, masks = awkward_maps_and_masks(seed)
    metrics = stream(maps, masks)
    assert metrics.is_exact
    assert metrics.result() == pytest.approx(pixel_metrics(maps, masks), rel=1e-12, abs=1e-15)
    assert set(metrics.error_bounds().values()) == {0.0}


def continuous_maps_and_masks(seed: int, n_images: int = 6) -> tuple[list, list]:
    """Float32 maps of 1.2 million pixels in all, more distinct scores than ``DEFAULT_MAX_BINS``,
    over about two binades, with blob regions scored somewhat higher."""
    rng = np.random.default_rng(seed)
    masks = [random_blob_mask(rng, (500, 400)) for _ in range(n_images)]
    maps = [(1.0 + rng.random((500, 400)) + 0.6 * mask).astype(np.float32) for mask in masks]
    return maps, masks


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_streamed_pixel_metrics_with_merged_bins_stay_within_their_bounds(seed: int) -> None:
    maps, masks = continuous_maps_and_masks(seed)
    metrics = stream(maps, masks)
    assert not metrics.is_exact
    exact, streamed, bounds = pixel_metrics(maps, masks), metrics.result(), metrics.error_bounds()
    for name, value in exact.items():
        assert abs(streamed[name] - value) <= bounds[name] + 1e-12, name
        assert abs(streamed[name] - value) < 1e-4, name
    assert max(bounds.values()) > 0.0


def test_streamed_pixel_metrics_do_not_depend_on_image_order() -> None:
    maps, masks = continuous_maps_and_masks(0)
    maps[4][0, 0] = 3e4  # an outlier in a late image opens far-away blocks
    forward = stream(maps, masks)
    backward = stream(maps[::-1], masks[::-1])
    assert forward.shift == backward.shift > 0
    assert forward.result() == pytest.approx(backward.result(), rel=1e-12)


def test_streamed_pixel_metrics_bounds_cover_a_separation_lost_in_merging() -> None:
    # Defects score one float32 step above the rest: perfectly separated at full resolution.
    # A normal image of 1.1 million distinct scores over 66 binades forces merges, after which 1.0
    # and the next float share a bin; the metrics change and the bounds must cover the change.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True
    anomaly_map = np.ones((4, 4), dtype=np.float32)
    anomaly_map[mask] = np.nextafter(np.float32(1.0), np.float32(2.0))
    spread = np.geomspace(1e-10, 1e10, 1100 * 1000, dtype=np.float32).reshape(1100, 1000)
    maps, masks = [anomaly_map, spread], [mask, np.zeros(spread.shape, dtype=bool)]
    metrics = stream(maps, masks)
    assert metrics.shift >= 1
    exact, streamed, bounds = pixel_metrics(maps, masks), metrics.result(), metrics.error_bounds()
    assert streamed["pixel_auroc"] < exact["pixel_auroc"]
    for name, value in exact.items():
        assert abs(streamed[name] - value) <= bounds[name] + 1e-12, name


def test_streamed_pixel_metrics_errors() -> None:
    metrics = StreamingPixelMetrics()
    with pytest.raises(FlawmapError, match="map 0 has shape"):
        metrics.add(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(FlawmapError, match="map 0 contains NaN"):
        metrics.add(np.array([[0.1, np.nan]]), np.array([[1, 0]]))
    with pytest.raises(FlawmapError, match="both normal and anomalous pixels"):
        metrics.result()
    metrics.add(np.eye(3), np.zeros((3, 3)))
    with pytest.raises(FlawmapError, match="got 0 anomalous and 9 normal"):
        metrics.result()
    with pytest.raises(FlawmapError, match="max_bins"):
        StreamingPixelMetrics(max_bins=DEFAULT_MAX_BINS // 2)
