"""Evaluation metrics for image scores and anomaly maps.

Metrics know nothing about methods: they take image scores with image labels, or anomaly maps with
ground-truth masks. Higher score = more anomalous, and label/mask value 1 (or True) = anomalous.

Every metric ranks the scores once and treats each distinct score ``t`` as one threshold that
predicts ``score >= t`` anomalous. Tied scores therefore enter or leave the prediction together, as
in scikit-learn. All curves are read off two cumulative counts over the thresholds, highest first::

    TP(t) = #anomalous samples with score >= t      (true positives)
    FP(t) = #normal samples with score >= t         (false positives)

>>> scores = np.array([0.1, 0.4, 0.35, 0.8])
>>> labels = np.array([0, 0, 1, 1])
>>> auroc(scores, labels)
0.75
>>> image_metrics(scores, labels)["image_f1_max"]
0.8
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from flawmap.errors import FlawmapError

DEFAULT_FPR_LIMIT = 0.3
"""The false-positive rate up to which AUPRO integrates, as in the MVTec AD benchmark."""

_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
"""Structuring element for ``ndimage.label``: diagonal neighbours belong to the same region."""


@dataclass(frozen=True)
class _Ranking:
    """Cumulative counts at every distinct score, highest score first.

    Attributes
    ----------
    thresholds : ndarray of shape (n_thresholds,)
        The distinct scores, descending; threshold k predicts ``score >= thresholds[k]`` anomalous.
    n_predicted : ndarray of shape (n_thresholds,), int64
        Samples predicted anomalous at each threshold, TP + FP.
    true_positives : ndarray of shape (n_thresholds,), int64
        Anomalous samples predicted anomalous at each threshold, TP.
    n_anomalous : int
        Anomalous samples in all, P.
    n_normal : int
        Normal samples in all, N.
    """

    thresholds: np.ndarray
    n_predicted: np.ndarray
    true_positives: np.ndarray
    n_anomalous: int
    n_normal: int

    @property
    def false_positives(self) -> np.ndarray:
        """Normal samples predicted anomalous at each threshold, FP; shape (n_thresholds,)."""
        return self.n_predicted - self.true_positives


@dataclass(frozen=True)
class _PixelScores:
    """The pixels of a set of anomaly maps, flattened once.

    Attributes
    ----------
    scores : ndarray of shape (n_pixels,)
        Every pixel of every map, concatenated.
    anomalous_scores : ndarray of shape (n_anomalous,)
        The pixels inside a ground-truth region.
    anomalous_weights : ndarray of shape (n_anomalous,), float64
        ``1 / (n_regions * size of the pixel's region)``: the pixel's share of the PRO.
    """

    scores: np.ndarray
    anomalous_scores: np.ndarray
    anomalous_weights: np.ndarray


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, with ties handled exactly (equals ``sklearn``'s ``roc_auc_score``).

    Parameters
    ----------
    scores : ndarray of shape (n_samples,)
        Anomaly scores, higher = more anomalous. Any shape is accepted if ``labels`` has the same.
    labels : ndarray of shape (n_samples,)
        1 or True for anomalous, 0 or False for normal; both classes must be present.

    Returns
    -------
    float
        The probability that a random anomalous sample outscores a random normal one, counting
        ties as one half.
    """
    return _auroc(_rank_labelled(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision, step-wise with tied scores grouped (equals ``sklearn``'s).

    ``scores`` and ``labels`` are as in :func:`auroc`.
    """
    return _average_precision(_rank_labelled(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds, and the threshold that reaches it.

    ``scores`` and ``labels`` are as in :func:`auroc`.

    Returns
    -------
    (f1, threshold) : tuple of float
        ``scores >= threshold`` predicted anomalous gives F1 ``f1``; of several thresholds with the
        same F1, the highest.
    """
    return _f1_max(_rank_labelled(scores, labels))


def aupro(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = DEFAULT_FPR_LIMIT
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Follows Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021. The regions are
    the 8-connected components of every mask. At threshold ``t``::

        PRO(t) = mean over all regions of all images of |region & (map >= t)| / |region|
        FPR(t) = |normal pixels with map >= t| / |normal pixels|, over all images

    The curve starts at (0, 0) and is integrated with the trapezoid rule, with PRO interpolated
    linearly at exactly ``fpr_limit``. A perfect map scores 1.0.

    Parameters
    ----------
    maps : sequence of ndarray of shape (H_i, W_i)
        Anomaly maps, higher = more anomalous; shapes may differ between images.
    masks : sequence of ndarray of shape (H_i, W_i)
        Ground truth, 1 or True for anomalous pixels, each the shape of its map.
    fpr_limit : float
        Integrate up to this false-positive rate, in (0, 1].

    Returns
    -------
    float
        The normalised area, in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise FlawmapError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    pixels = _flatten_pixels(maps, masks)
    ranking = _rank(pixels.scores, pixels.anomalous_scores, unit="pixels")
    return _aupro(ranking, pixels, fpr_limit)


def pixel_metrics(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Pixel AUROC, AUPRO (up to FPR 0.3) and pixel average precision from one ranking.

    The pixels are flattened and sorted once and all three metrics share that ranking.
    ``maps`` and ``masks`` are as in :func:`aupro`.

    Returns
    -------
    dict
        ``{"pixel_auroc": float, "aupro": float, "pixel_ap": float}``.
    """
    pixels = _flatten_pixels(maps, masks)
    ranking = _rank(pixels.scores, pixels.anomalous_scores, unit="pixels")
    return {
        "pixel_auroc": _auroc(ranking),
        "aupro": _aupro(ranking, pixels, DEFAULT_FPR_LIMIT),
        "pixel_ap": _average_precision(ranking),
    }


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image AUROC, average precision and best F1 from one ranking.

    Parameters
    ----------
    scores : ndarray of shape (n_images,)
        Image anomaly scores, higher = more anomalous.
    labels : ndarray of shape (n_images,)
        1 or True for anomalous images, 0 or False for normal; both classes must be present.

    Returns
    -------
    dict
        ``{"image_auroc": float, "image_ap": float, "image_f1_max": float}``.
    """
    ranking = _rank_labelled(scores, labels)
    best_f1, _ = _f1_max(ranking)
    return {
        "image_auroc": _auroc(ranking),
        "image_ap": _average_precision(ranking),
        "image_f1_max": best_f1,
    }


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve whose area :func:`auroc` is: one point per distinct score, from (0, 0).

    ``scores`` and ``labels`` are as in :func:`auroc`.

    Returns
    -------
    (fpr, tpr) : tuple of ndarray of shape (n_thresholds + 1,)
        False- and true-positive rates, non-decreasing, starting at 0 and ending at 1.
    """
    ranking = _rank_labelled(scores, labels)
    fpr = ranking.false_positives / ranking.n_normal
    tpr = ranking.true_positives / ranking.n_anomalous
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], tpr))


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve that :func:`aupro` integrates, over all false-positive rates.

    ``maps`` and ``masks`` are as in :func:`aupro`.

    Returns
    -------
    (fpr, pro) : tuple of ndarray of shape (n_thresholds + 1,)
        Pixel false-positive rate and mean region overlap at every distinct pixel score, from (0, 0).
    """
    pixels = _flatten_pixels(maps, masks)
    return _pro_points(_rank(pixels.scores, pixels.anomalous_scores, unit="pixels"), pixels)


def _auroc(ranking: _Ranking) -> float:
    """Trapezoid area under the ROC curve through (FP_k / N, TP_k / P), from (0, 0).

    In integers, so exact until the one division:
    AUROC = sum_k (FP_k - FP_{k-1}) * (TP_k + TP_{k-1}) / (2 P N).
    """
    true_positives = np.concatenate(([0], ranking.true_positives))
    false_positive_steps = np.diff(ranking.false_positives, prepend=0)
    twice_area = int(np.dot(false_positive_steps, true_positives[1:] + true_positives[:-1]))
    return twice_area / (2 * ranking.n_anomalous * ranking.n_normal)


def _average_precision(ranking: _Ranking) -> float:
    """AP = sum_k (R_k - R_{k-1}) * Prec_k, with R_k = TP_k / P and Prec_k = TP_k / (TP_k + FP_k)."""
    true_positive_steps = np.diff(ranking.true_positives, prepend=0)
    precision = ranking.true_positives / ranking.n_predicted
    return float(np.dot(true_positive_steps, precision)) / ranking.n_anomalous


def _f1_max(ranking: _Ranking) -> tuple[float, float]:
    """Best F1 and its threshold; F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) = 2 TP_k / (TP_k + FP_k + P)."""
    f1 = 2 * ranking.true_positives / (ranking.n_predicted + ranking.n_anomalous)
    best = int(np.argmax(f1))
    return float(f1[best]), float(ranking.thresholds[best])


def _aupro(ranking: _Ranking, pixels: _PixelScores, fpr_limit: float) -> float:
    """AUPRO from a ranking of ``pixels.scores``; see :func:`aupro`.

    PRO(t_k) = sum of the weights w = 1 / (n_regions * region size) of the anomalous pixels with
    score >= t_k, and those are exactly the first TP_k anomalous pixels in descending score order.
    """
    return _area_up_to(*_pro_points(ranking, pixels), fpr_limit) / fpr_limit


def _pro_points(ranking: _Ranking, pixels: _PixelScores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every threshold of ``ranking``, from (0, 0); see :func:`_aupro`."""
    descending = np.argsort(pixels.anomalous_scores)[::-1]
    pro_of_first = np.concatenate(([0.0], np.cumsum(pixels.anomalous_weights[descending])))
    pro = pro_of_first[ranking.true_positives]
    fpr = ranking.false_positives / ranking.n_normal
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under the polyline through (x, y) over [0, x_limit].

    Parameters
    ----------
    x : ndarray of shape (n_points,)
        Non-decreasing, from 0 to 1; equal neighbours make vertical steps.
    y : ndarray of shape (n_points,)
        Curve heights.
    x_limit : float
        In (0, 1]. Where it falls inside a segment, y is interpolated linearly there.
    """
    n_inside = int(np.searchsorted(x, x_limit, side="right"))  # points with x <= x_limit
    x_inside, y_inside = x[:n_inside], y[:n_inside]
    twice_area = float(np.dot(np.diff(x_inside), y_inside[1:] + y_inside[:-1]))
    x_last, y_last = x_inside[-1], y_inside[-1]
    if x_last < x_limit:  # the limit cuts the segment from point n_inside - 1 to point n_inside
        x_next, y_next = x[n_inside], y[n_inside]
        y_limit = y_last + (y_next - y_last) * (x_limit - x_last) / (x_next - x_last)
        twice_area += (x_limit - x_last) * (y_last + y_limit)
    return float(twice_area) / 2


def _rank(scores: np.ndarray, anomalous_scores: np.ndarray, unit: str) -> _Ranking:
    """Count TP and TP + FP at every distinct score with one sort of all the scores.

    Parameters
    ----------
    scores : ndarray of shape (n_samples,)
        All scores, anomalous and normal.
    anomalous_scores : ndarray of shape (n_anomalous,)
        The anomalous samples' scores (a subset of ``scores``), in any order.
    unit : str
        What a sample is ("samples", "pixels"), for the error message.
    """
    n_anomalous = anomalous_scores.size
    n_normal = scores.size - n_anomalous
    if n_anomalous == 0 or n_normal == 0:
        raise FlawmapError(
            f"metrics need both normal and anomalous {unit}; got {n_anomalous} anomalous "
            f"and {n_normal} normal"
        )
    ascending = np.sort(scores)
    if np.isnan(ascending[-1]):  # np.sort puts NaN last
        raise FlawmapError("scores contain NaN")
    # In ascending order, a distinct score t first appears at index i; then TP + FP = n - i.
    is_first_of_value = np.empty(ascending.size, dtype=bool)
    is_first_of_value[0] = True
    np.not_equal(ascending[1:], ascending[:-1], out=is_first_of_value[1:])
    first_index = np.flatnonzero(is_first_of_value)
    del is_first_of_value
    thresholds = ascending[first_index]
    del ascending
    n_predicted = np.subtract(scores.size, first_index, out=first_index)
    anomalous_below = np.searchsorted(np.sort(anomalous_scores), thresholds, side="left")
    true_positives = np.subtract(n_anomalous, anomalous_below, out=anomalous_below)
    return _Ranking(
        thresholds=thresholds[::-1],
        n_predicted=n_predicted[::-1],
        true_positives=true_positives[::-1],
        n_anomalous=n_anomalous,
        n_normal=n_normal,
    )


def _rank_labelled(scores: np.ndarray, labels: np.ndarray) -> _Ranking:
    """Validate image-style inputs (scores and labels of one shape) and rank them."""
    scores = _as_scores(scores, "scores")
    labels = _as_binary(labels, "labels")
    if scores.shape != labels.shape:
        raise FlawmapError(f"scores have shape {scores.shape} but labels have shape {labels.shape}")
    scores = scores.ravel()
    return _rank(scores, scores[labels.ravel()], unit="samples")


def _flatten_pixels(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> _PixelScores:
    """Validate maps and masks, label the masks' 8-connected regions and flatten all pixels once."""
    if len(maps) != len(masks):
        raise FlawmapError(f"got {len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise FlawmapError("got no maps")
    flat_maps, anomalous_scores, region_ids = [], [], []
    n_regions = 0
    for index, (anomaly_map, mask) in enumerate(zip(maps, masks)):
        anomaly_map = _as_scores(anomaly_map, f"map {index}")
        mask = _as_binary(mask, f"mask {index}")
        if anomaly_map.ndim != 2 or anomaly_map.shape != mask.shape:
            raise FlawmapError(
                f"map {index} has shape {anomaly_map.shape} and its mask {mask.shape}; "
                "both must be the same 2-D shape"
            )
        regions, n_image_regions = ndimage.label(mask, structure=_EIGHT_CONNECTIVITY)
        flat_maps.append(anomaly_map.ravel())
        anomalous_scores.append(anomaly_map[mask])
        region_ids.append(regions[mask] - 1 + n_regions)  # 0 .. n_regions - 1 across all images
        n_regions += n_image_regions
    region_ids = np.concatenate(region_ids)
    region_sizes = np.bincount(region_ids, minlength=n_regions)
    return _PixelScores(
        scores=np.concatenate(flat_maps),
        anomalous_scores=np.concatenate(anomalous_scores),
        anomalous_weights=1.0 / (n_regions * region_sizes[region_ids]),
    )


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as an ndarray of real numbers; FlawmapError naming ``name`` otherwise."""
    values = np.asarray(values)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise FlawmapError(f"{name} must hold real numbers; got dtype {values.dtype}")
    return values


def _as_binary(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as a bool ndarray; FlawmapError naming ``name`` unless they are all 0/1 or bool."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    binary = values.astype(bool)
    if not np.array_equal(values, binary):
        raise FlawmapError(f"{name} must hold only 0 and 1 (or booleans)")
    return binary
