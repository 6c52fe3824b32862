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

:class:`StreamingPixelMetrics` computes the pixel metrics image by image in memory that does not
grow with the number of images: it counts pixels in bins of their float32 representation, exact
while the scores seen need at most ``max_bins`` bins and otherwise with bins of a few units in the
last place, and it bounds the error that binning can cause (:meth:`StreamingPixelMetrics.error_bounds`).
:func:`pixel_metrics` sorts all pixels at once and is exact; it is the reference the streamed
metrics are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from flawmap.errors import FlawmapError
from flawmap.regions import CONNECTIVITY

DEFAULT_FPR_LIMIT = 0.3
"""The false-positive rate up to which AUPRO integrates, as in the MVTec AD benchmark."""

DEFAULT_MAX_BINS = 2**20
"""Bins of :class:`StreamingPixelMetrics` (24 bytes each, 24 MiB in all)."""

_BLOCK_BITS = 12
""":class:`StreamingPixelMetrics` bins the lower 12 bits of a key within blocks of the upper 20."""
_BLOCK_SIZE = 1 << _BLOCK_BITS
_N_BLOCKS = 1 << (32 - _BLOCK_BITS)

_SIGN_BIT = np.uint32(0x80000000)
_ALL_BITS = np.uint32(0xFFFFFFFF)
_NAN_FREE_KEYS = (0x007FFFFF, 0xFF800000)
"""Order keys of -inf and +inf: keys outside this range belong to NaNs."""


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
    return _aupro(ranking, _exact_pro(ranking, pixels), fpr_limit)


def pixel_metrics(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Pixel AUROC, AUPRO (up to FPR 0.3), pixel average precision and best pixel F1, exactly.

    The pixels are flattened and sorted once and all four metrics share that ranking, so memory
    grows with the number of pixels; :class:`StreamingPixelMetrics` does not.
    ``maps`` and ``masks`` are as in :func:`aupro`.

    Returns
    -------
    dict
        ``{"pixel_auroc": float, "aupro": float, "pixel_ap": float, "pixel_f1_max": float}``.
    """
    pixels = _flatten_pixels(maps, masks)
    ranking = _rank(pixels.scores, pixels.anomalous_scores, unit="pixels")
    return _pixel_metrics(ranking, _exact_pro(ranking, pixels))


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
    return _from_origin(ranking.false_positives / ranking.n_normal, ranking.true_positives / ranking.n_anomalous)


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve that :func:`aupro` integrates, over all false-positive rates.

    ``maps`` and ``masks`` are as in :func:`aupro`.

    Returns
    -------
    (fpr, pro) : tuple of ndarray of shape (n_thresholds + 1,)
        Pixel false-positive rate and mean region overlap at every distinct pixel score, from (0, 0).
    """
    pixels = _flatten_pixels(maps, masks)
    ranking = _rank(pixels.scores, pixels.anomalous_scores, unit="pixels")
    return _from_origin(ranking.false_positives / ranking.n_normal, _exact_pro(ranking, pixels))


class StreamingPixelMetrics:
    """The pixel metrics of :func:`pixel_metrics`, accumulated one map at a time.

    Memory does not grow with the number of images: three histograms over at most ``max_bins``
    bins (24 bytes each) hold, per bin of scores, all pixels, the anomalous pixels and the
    anomalous pixels' share of the PRO (``1 / size of the pixel's region``). Every metric is read
    off their cumulative sums from the highest bin down, as :func:`pixel_metrics` reads them off
    the sorted pixels.

    While at most ``max_bins`` distinct scores have been seen, each has its own bin and the
    metrics equal :func:`pixel_metrics` of the maps as float32. Beyond that, bins follow the
    float32 representation, so their width is relative to the score and no score range is needed
    in advance. Scores are mapped to 32-bit keys that sort like them (their bits, sign handled).
    The upper 20 bits (sign, exponent, 11 mantissa bits) pick a *block*, and only blocks that hold
    a score get bins: ``2**(12 - shift)`` each, by the lower 12 bits. Whenever the occupied
    blocks would need more than ``max_bins`` bins, neighbouring bins are merged in pairs
    (``shift + 1``). Scores over four binades (e.g. 0.5 to 8) occupy 8,192 blocks and keep 18 of
    the 23 mantissa bits at the default ``max_bins``. :meth:`error_bounds` bounds what the merging
    can change in each metric.

    >>> rng = np.random.default_rng(0)
    >>> metrics = StreamingPixelMetrics()
    >>> for _ in range(3):
    ...     mask = np.zeros((8, 8), dtype=bool)
    ...     mask[2:4, 2:5] = True
    ...     metrics.add(rng.random((8, 8)) + mask, mask)
    >>> sorted(metrics.result())
    ['aupro', 'pixel_ap', 'pixel_auroc', 'pixel_f1_max']
    >>> metrics.result()["pixel_auroc"]
    1.0
    """

    def __init__(self, max_bins: int = DEFAULT_MAX_BINS) -> None:
        if max_bins < _N_BLOCKS:
            raise FlawmapError(f"max_bins must be at least {_N_BLOCKS}, got {max_bins}")
        self.max_bins = max_bins
        self.shift = 0
        self.n_images = 0
        self.n_regions = 0
        # Per bin: all pixels, anomalous pixels, summed 1 / region size of the anomalous pixels.
        self._pixels = np.zeros(0, dtype=np.int64)
        self._anomalous = np.zeros(0, dtype=np.int64)
        self._region_shares = np.zeros(0, dtype=np.float64)
        # Exact: the bins are these distinct keys, ascending; None once binned by blocks.
        self._keys: np.ndarray | None = np.zeros(0, dtype=np.uint32)
        # Binned: slot-major bins of the occupied blocks (the block of each slot, in order of arrival).
        self._slot_of_block = np.full(_N_BLOCKS, -1, dtype=np.int32)
        self._blocks = np.zeros(0, dtype=np.int64)

    @property
    def bins_per_block(self) -> int:
        """Bins of each occupied block once binned: ``2**(12 - shift)``."""
        return _BLOCK_SIZE >> self.shift

    @property
    def is_exact(self) -> bool:
        """Whether every bin holds one float32 value, so that the metrics are exact."""
        return self.shift == 0

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """Count one map (H, W) and its ground-truth mask (H, W), 1 or True where anomalous."""
        anomaly_map, mask = _checked_map_and_mask(anomaly_map, mask, self.n_images)
        keys = _order_keys(anomaly_map, f"map {self.n_images}")
        inverse_sizes, n_regions = _inverse_region_sizes(mask) if mask.any() else (np.zeros(0), 0)
        if self._keys is not None:
            self._count_distinct(keys, mask.ravel(), inverse_sizes)
            if self._keys.size > self.max_bins:
                self._switch_to_blocks()
        else:
            self._count_in_blocks(keys, None, mask.ravel(), inverse_sizes)
        self.n_regions += n_regions
        self.n_images += 1

    def result(self) -> dict[str, float]:
        """``{"pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max"}`` over the maps added so far."""
        return _pixel_metrics(*self._ranking())

    def error_bounds(self) -> dict[str, float]:
        """For each metric of :meth:`result`, a bound on its distance to :func:`pixel_metrics`.

        All are 0 while :attr:`is_exact`. Otherwise the pixels inside one bin count as tied, and the
        exact curves run anywhere inside each bin's box between the tied and untied orders:

        - AUROC: pairs of an anomalous and a normal pixel in one bin count 1/2 where they count
          0 or 1 exactly: ``sum_b a_b n_b / (2 P N)``;
        - AP: a bin's recall step ``a_b / P`` is weighted by a precision between the bin's lowest
          ``(TP_above + 1) / (TP_above + 1 + FP_b)`` and highest ``TP_b / (TP_b + FP_above)``;
        - F1-max: no threshold inside a bin beats ``2 TP_b / (TP_b + FP_above + P)``;
        - AUPRO: the curve stays inside each bin's FPR x PRO box, up to the FPR limit.
        """
        if self.is_exact:
            return dict.fromkeys(("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max"), 0.0)
        ranking, pro = self._ranking()
        n_anomalous, n_normal = ranking.n_anomalous, ranking.n_normal
        true_positives = ranking.true_positives.astype(np.float64)
        false_positives = ranking.false_positives.astype(np.float64)
        true_above = np.concatenate(([0.0], true_positives[:-1]))
        false_above = np.concatenate(([0.0], false_positives[:-1]))
        anomalous_in_bin = true_positives - true_above
        auroc_bound = float(np.dot(anomalous_in_bin, false_positives - false_above)) / (2 * n_anomalous * n_normal)
        steps = anomalous_in_bin > 0
        highest_precision = true_positives[steps] / (true_positives[steps] + false_above[steps])
        lowest_precision = (true_above[steps] + 1) / (true_above[steps] + 1 + false_positives[steps])
        ap_bound = float(np.dot(anomalous_in_bin[steps], highest_precision - lowest_precision)) / n_anomalous
        f1_bound = float(np.max(2 * true_positives / (true_positives + false_above + n_anomalous))) - _f1_max(ranking)[0]
        fpr, fpr_above = false_positives / n_normal, false_above / n_normal
        pro_above = np.concatenate(([0.0], pro[:-1]))
        width = np.clip(np.minimum(fpr, DEFAULT_FPR_LIMIT) - fpr_above, 0.0, None)
        aupro_bound = float(np.dot(width, pro - pro_above)) / DEFAULT_FPR_LIMIT
        return {"pixel_auroc": auroc_bound, "aupro": aupro_bound, "pixel_ap": ap_bound, "pixel_f1_max": f1_bound}

    def _ranking(self) -> tuple[_Ranking, np.ndarray]:
        """The occupied bins as a :class:`_Ranking` (threshold: a bin's lowest score) and the PRO
        at each of them."""
        n_pixels, n_anomalous = int(self._pixels.sum()), int(self._anomalous.sum())
        _check_both_classes(n_anomalous, n_pixels - n_anomalous, "pixels")
        if self._keys is not None:
            bins, lowest_keys = np.arange(self._keys.size), self._keys
        else:
            by_block = np.argsort(self._blocks)
            bins = (by_block[:, None] * self.bins_per_block + np.arange(self.bins_per_block)).ravel()
            bins = bins[self._pixels[bins] > 0]
            slots, offsets = np.divmod(bins, self.bins_per_block)
            lowest_keys = ((self._blocks[slots] << _BLOCK_BITS) + (offsets << self.shift)).astype(np.uint32)
        descending = bins[::-1]
        ranking = _Ranking(
            thresholds=_scores_of_keys(lowest_keys[::-1]),
            n_predicted=np.cumsum(self._pixels[descending]),
            true_positives=np.cumsum(self._anomalous[descending]),
            n_anomalous=n_anomalous,
            n_normal=n_pixels - n_anomalous,
        )
        return ranking, np.cumsum(self._region_shares[descending]) / self.n_regions

    def _count_distinct(self, keys: np.ndarray, anomalous: np.ndarray, inverse_sizes: np.ndarray) -> None:
        """Add pixels with ``keys`` (n,), flagged ``anomalous`` (n,), to the exact bins."""
        n_before = self._keys.size
        self._keys, bins = np.unique(np.concatenate((self._keys, keys)), return_inverse=True)
        old_bins, new_bins = bins[:n_before], bins[n_before:]
        self._pixels, self._anomalous, self._region_shares = (
            _moved(counts, old_bins, self._keys.size) for counts in (self._pixels, self._anomalous, self._region_shares)
        )
        _add_counts(self._pixels, new_bins)
        _add_counts(self._anomalous, new_bins[anomalous])
        _add_counts(self._region_shares, new_bins[anomalous], weights=inverse_sizes)

    def _switch_to_blocks(self) -> None:
        """Re-count the exact bins in blocks (which merges bins at least once)."""
        keys, counts = self._keys, (self._pixels, self._anomalous, self._region_shares)
        self._keys = None
        self._pixels, self._anomalous, self._region_shares = (np.zeros(0, dtype=c.dtype) for c in counts)
        self._count_in_blocks(keys, *counts)

    def _count_in_blocks(
        self, keys: np.ndarray, pixels: np.ndarray | None, anomalous: np.ndarray, shares: np.ndarray
    ) -> None:
        """Add to the block bins: ``pixels`` (n,) counts at ``keys`` (n,), or one pixel each if
        None, ``anomalous`` (n,) counts or flags, and the ``shares`` of the anomalous ones."""
        blocks = keys >> np.uint32(_BLOCK_BITS)
        slots = self._slot_of_block[blocks]
        new = slots < 0
        if new.any():
            self._occupy(np.unique(blocks[new]))
            slots = self._slot_of_block[blocks]
        bins = slots.astype(np.int64)
        bins *= self.bins_per_block
        offsets = np.bitwise_and(keys, np.uint32(_BLOCK_SIZE - 1))
        bins += np.right_shift(offsets, np.uint32(self.shift), out=offsets)
        _add_counts(self._pixels, bins, weights=pixels)
        if anomalous.dtype == bool:
            _add_counts(self._anomalous, bins[anomalous])
            _add_counts(self._region_shares, bins[anomalous], weights=shares)
        else:
            _add_counts(self._anomalous, bins, weights=anomalous)
            _add_counts(self._region_shares, bins, weights=shares)

    def _occupy(self, new_blocks: np.ndarray) -> None:
        """Give each of ``new_blocks`` its bins, merging bins in pairs while over budget."""
        n_slots = self._blocks.size + new_blocks.size
        while n_slots * self.bins_per_block > self.max_bins:
            self._merge_pairs()
        self._slot_of_block[new_blocks] = np.arange(self._blocks.size, n_slots)
        self._blocks = np.concatenate((self._blocks, new_blocks))
        grow = new_blocks.size * self.bins_per_block
        self._pixels, self._anomalous, self._region_shares = (
            np.concatenate((counts, np.zeros(grow, dtype=counts.dtype)))
            for counts in (self._pixels, self._anomalous, self._region_shares)
        )

    def _merge_pairs(self) -> None:
        """Halve the resolution: bins ``2j`` and ``2j + 1`` of each block become bin ``j``."""
        self._pixels, self._anomalous, self._region_shares = (
            counts.reshape(-1, 2).sum(axis=1) for counts in (self._pixels, self._anomalous, self._region_shares)
        )
        self.shift += 1


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


def _pixel_metrics(ranking: _Ranking, pro: np.ndarray) -> dict[str, float]:
    """The pixel metrics from a ranking of pixels and the PRO at each of its thresholds."""
    return {
        "pixel_auroc": _auroc(ranking),
        "aupro": _aupro(ranking, pro, DEFAULT_FPR_LIMIT),
        "pixel_ap": _average_precision(ranking),
        "pixel_f1_max": _f1_max(ranking)[0],
    }


def _exact_pro(ranking: _Ranking, pixels: _PixelScores) -> np.ndarray:
    """PRO at each threshold of a ranking of ``pixels.scores``; shape (n_thresholds,).

    PRO(t_k) = sum of the weights w = 1 / (n_regions * region size) of the anomalous pixels with
    score >= t_k, and those are exactly the first TP_k anomalous pixels in descending score order.
    """
    descending = np.argsort(pixels.anomalous_scores)[::-1]
    pro_of_first = np.concatenate(([0.0], np.cumsum(pixels.anomalous_weights[descending])))
    return pro_of_first[ranking.true_positives]


def _aupro(ranking: _Ranking, pro: np.ndarray, fpr_limit: float) -> float:
    """AUPRO from a ranking and the PRO at each of its thresholds; see :func:`aupro`."""
    return _area_up_to(*_from_origin(ranking.false_positives / ranking.n_normal, pro), fpr_limit) / fpr_limit


def _from_origin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The curve through the points (x, y), preceded by (0, 0)."""
    return np.concatenate(([0.0], x)), np.concatenate(([0.0], y))


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
    _check_both_classes(n_anomalous, n_normal, unit)
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


def _check_both_classes(n_anomalous: int, n_normal: int, unit: str) -> None:
    """FlawmapError unless there are anomalous and normal ``unit`` ("samples", "pixels")."""
    if n_anomalous == 0 or n_normal == 0:
        raise FlawmapError(
            f"metrics need both normal and anomalous {unit}; got {n_anomalous} anomalous "
            f"and {n_normal} normal"
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
    flat_maps, anomalous_scores, inverse_sizes = [], [], []
    n_regions = 0
    for index, (anomaly_map, mask) in enumerate(zip(maps, masks)):
        anomaly_map, mask = _checked_map_and_mask(anomaly_map, mask, index)
        image_inverse_sizes, n_image_regions = _inverse_region_sizes(mask)
        flat_maps.append(anomaly_map.ravel())
        anomalous_scores.append(anomaly_map[mask])
        inverse_sizes.append(image_inverse_sizes)
        n_regions += n_image_regions
    return _PixelScores(
        scores=np.concatenate(flat_maps),
        anomalous_scores=np.concatenate(anomalous_scores),
        anomalous_weights=np.concatenate(inverse_sizes) / n_regions if n_regions else np.zeros(0),
    )


def _checked_map_and_mask(anomaly_map: np.ndarray, mask: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Map ``index`` as real numbers and its mask as bool, both the same 2-D shape; else FlawmapError."""
    anomaly_map = _as_scores(anomaly_map, f"map {index}")
    mask = _as_binary(mask, f"mask {index}")
    if anomaly_map.ndim != 2 or anomaly_map.shape != mask.shape:
        raise FlawmapError(
            f"map {index} has shape {anomaly_map.shape} and its mask {mask.shape}; "
            "both must be the same 2-D shape"
        )
    return anomaly_map, mask


def _inverse_region_sizes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``1 / size of its 8-connected region`` for each anomalous pixel of ``mask`` (H, W), in
    row-major order, and the number of regions."""
    regions, n_regions = ndimage.label(mask, structure=CONNECTIVITY)
    region_of_pixel = regions[mask]
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / sizes[region_of_pixel], n_regions


def _add_counts(histogram: np.ndarray, bins: np.ndarray, weights: np.ndarray | None = None) -> None:
    """Add the number (or the summed ``weights``) of ``bins`` entries in each bin to ``histogram``."""
    counts = np.bincount(bins, weights=weights)
    histogram[: counts.size] += counts.astype(histogram.dtype, copy=False)


def _moved(counts: np.ndarray, new_places: np.ndarray, size: int) -> np.ndarray:
    """``counts`` placed at ``new_places`` in a zero array of ``size`` (bins renumbered)."""
    moved = np.zeros(size, dtype=counts.dtype)
    moved[new_places] = counts
    return moved


def _order_keys(scores: np.ndarray, name: str) -> np.ndarray:
    """Scores (any shape) as float32 to uint32 keys (flattened) that sort as the scores do.

    A positive float's bits sort like the float once the sign bit is set; a negative float's
    sort in reverse, so all its bits are flipped. -0.0 becomes +0.0 first so that equal scores
    get equal keys. FlawmapError naming ``name`` if a score is NaN.
    """
    values = np.asarray(scores, dtype=np.float32).ravel() + np.float32(0.0)
    keys = values.view(np.uint32)
    flip = keys >> np.uint32(31)  # 1 for negative scores
    flip *= np.uint32(0x7FFFFFFF)
    flip |= _SIGN_BIT  # all bits for negative scores, the sign bit for the others
    keys ^= flip
    lowest, highest = _NAN_FREE_KEYS
    if keys.size and (keys.min() < lowest or keys.max() > highest):
        raise FlawmapError(f"{name} contains NaN")
    return keys


def _scores_of_keys(keys: np.ndarray) -> np.ndarray:
    """The float32 scores of uint32 order keys: the inverse of :func:`_order_keys`."""
    bits = np.bitwise_xor(keys, np.where(keys & _SIGN_BIT, _SIGN_BIT, _ALL_BITS))
    return bits.view(np.float32)


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
