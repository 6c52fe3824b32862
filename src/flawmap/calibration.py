"""Score thresholds from normal images only: a quantile that means what it says.

A model flags an image when its score exceeds ``threshold_``; the user asks for a false-alarm rate
``r`` (the share of normal images flagged), so the threshold is an estimate of the ``1 - r``
quantile of normal scores. Those scores must be *out of sample*: a training image scored by a
model that learned from it looks more normal than any new image (for a memory bank, its own
patches are in the bank), so models collect them by cross-fitting where that is cheap and from
held-out images otherwise (:mod:`flawmap.models.calibrators`).

The quantile estimator (:func:`calibrate_threshold`):

- with at least :data:`MIN_EXCEEDANCES` normal scores expected above the threshold (``n r``), the
  empirical quantile, linearly interpolated between order statistics;
- with fewer, the empirical quantile is one of the few largest scores, or above all of them when
  ``r < 1/n``; then a tail model is fitted (peaks over threshold): the ``k`` largest scores above
  the ``(k+1)``-th largest ``u`` are modelled as exponential exceedances,
  ``P(S > u + x) = (k / n) exp(-x / beta)`` with ``beta`` their mean excess (the maximum
  likelihood estimate), so ``threshold = u + beta ln(k / (n r))``. Image scores of these methods
  are maxima over many patches, whose tails are light (the Gumbel domain), where the exponential
  is the limiting excess distribution; the generalised Pareto shape is not estimated because a
  few dozen scores cannot pin it down.

Uncertainty: the estimator is repeated on :data:`BOOTSTRAP_SAMPLES` bootstrap resamples of the
scores; the 5 % and 95 % quantiles of those thresholds form a 90 % interval, and the fitted
survival function at the interval's ends gives the range of false-alarm rates it implies.
Fewer than :data:`MIN_RELIABLE_SCORES` normal scores give a :class:`CalibrationWarning`.

Re-calibration on new images (``flawmap calibrate``) needs at least :data:`MIN_CALIBRATION_IMAGES`
distinct ones, none of them a training image. The floor is distribution-free: a new normal image
exceeds the largest of ``n`` normal scores with probability ``1 / (n + 1)``, so below 10 images
not even the largest score is known to keep the false-alarm rate under 10 %, and the threshold
would rest on the tail model's extrapolation alone (with one image: a zero-width interval and a
threshold at that image's score, which flags about every other good image). Training images
are refused because their scores are in-sample: too low, so the threshold drops and good images
are flagged. The calibrations a model had before are kept (the last
:data:`CALIBRATION_HISTORY_LENGTH`) and one can be put back.

This module needs numpy only (no torch), so exported models can be re-calibrated too.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from flawmap.errors import FlawmapError

#: Expected exceedances below which the tail model replaces the empirical quantile.
MIN_EXCEEDANCES = 5
#: Fewer normal scores than this give a CalibrationWarning.
MIN_RELIABLE_SCORES = 20
#: Bootstrap resamples behind the uncertainty interval.
BOOTSTRAP_SAMPLES = 200
#: Distinct new normal images ``calibrate`` needs, at least (module docstring).
MIN_CALIBRATION_IMAGES = 10
#: Earlier calibrations a model keeps (restorable), at most.
CALIBRATION_HISTORY_LENGTH = 10
#: Share of the scores the tail model is fitted on (at least MIN_EXCEEDANCES of them).
TAIL_SHARE = 0.2


class CalibrationWarning(UserWarning):
    """The threshold rests on few normal scores; its false-alarm rate is uncertain."""


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and where it came from (saved in a model's ``config.json``).

    Attributes
    ----------
    threshold : float
        Image scores above it are anomalous.
    false_alarm_rate : float
        The target share of normal images above ``threshold``.
    n_scores : int
        Out-of-sample normal scores it was estimated from.
    estimator : str
        ``"empirical"`` quantile or ``"exponential tail"`` model (see the module docstring).
    threshold_interval : (float, float)
        90 % bootstrap interval of the threshold.
    false_alarm_rate_interval : (float, float)
        False-alarm rates at the ends of ``threshold_interval`` (upper end first reversed: low, high).
    source : str
        How the normal scores were obtained, e.g. ``"cross-fit: 209 training images"``.
    """

    threshold: float
    false_alarm_rate: float
    n_scores: int
    estimator: str
    threshold_interval: tuple[float, float]
    false_alarm_rate_interval: tuple[float, float]
    source: str

    def to_json(self) -> dict:
        """A JSON-ready dict (see :meth:`from_json`)."""
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict) -> "Calibration":
        """The Calibration whose :meth:`to_json` was ``document``; ValueError if malformed."""
        try:
            values = {**document}
            values["threshold_interval"] = tuple(float(v) for v in values["threshold_interval"])
            values["false_alarm_rate_interval"] = tuple(float(v) for v in values["false_alarm_rate_interval"])
            calibration = cls(**values)
        except (TypeError, KeyError) as error:
            raise ValueError(f"malformed calibration record ({error})") from None
        if not isinstance(calibration.threshold, (int, float)) or not isinstance(calibration.n_scores, int):
            raise ValueError("malformed calibration record (threshold or n_scores)")
        return calibration


def check_false_alarm_rate(rate: float) -> None:
    """Raise FlawmapError unless ``0 < rate < 1``."""
    if not (isinstance(rate, (int, float)) and 0.0 < rate < 1.0):
        raise FlawmapError(f"false_alarm_rate must be in (0, 1), got {rate}")


def check_calibration_count(count: int, kind: str) -> None:
    """FlawmapError unless ``count`` (``kind``: "valid ", "distinct ") new normal images reach
    :data:`MIN_CALIBRATION_IMAGES`."""
    if count < MIN_CALIBRATION_IMAGES:
        raise FlawmapError(
            f"calibrate needs at least {MIN_CALIBRATION_IMAGES} {kind}good images, got {count}: with fewer, "
            "the false-alarm rate of the threshold is unknown (see flawmap.calibration)"
        )


def calibrate_threshold(
    normal_scores: np.ndarray, false_alarm_rate: float, *, source: str, random_state: int = 0
) -> Calibration:
    """The threshold above which a share ``false_alarm_rate`` of normal images is expected.

    Parameters
    ----------
    normal_scores : ndarray of shape (n,)
        Out-of-sample image scores of normal images.
    false_alarm_rate : float
        Target rate, in (0, 1).
    source : str
        Recorded in the result: how the scores were obtained.
    random_state : int
        Seed of the bootstrap.
    """
    check_false_alarm_rate(false_alarm_rate)
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise FlawmapError("no normal scores to calibrate the threshold on")
    if not np.isfinite(scores).all():
        raise FlawmapError("the normal calibration scores are not all finite; the model is broken")
    if scores.size < MIN_RELIABLE_SCORES:
        warnings.warn(
            f"only {scores.size} normal images calibrate the threshold (fewer than {MIN_RELIABLE_SCORES}); "
            "its false-alarm rate is uncertain; give more good images or run `flawmap calibrate`",
            CalibrationWarning,
            stacklevel=2,
        )
    threshold, estimator = quantile_estimate(scores, false_alarm_rate)
    rng = np.random.default_rng(random_state)
    resampled = np.sort(rng.choice(scores, size=(BOOTSTRAP_SAMPLES, scores.size), replace=True), axis=1)
    boot = np.array([quantile_estimate(row, false_alarm_rate)[0] for row in resampled])
    low, high = (float(v) for v in np.quantile(boot, [0.05, 0.95]))
    rates = (survival(scores, high), survival(scores, low))
    return Calibration(
        threshold=float(threshold),
        false_alarm_rate=float(false_alarm_rate),
        n_scores=int(scores.size),
        estimator=estimator,
        threshold_interval=(low, high),
        false_alarm_rate_interval=rates,
        source=source,
    )


def quantile_estimate(sorted_scores: np.ndarray, rate: float) -> tuple[float, str]:
    """The ``1 - rate`` quantile of ascending scores (n,) and the estimator's name."""
    n = sorted_scores.size
    tail = _tail_size(n)
    if n * rate >= MIN_EXCEEDANCES or tail is None or tail <= n * rate:
        return float(np.quantile(sorted_scores, 1.0 - rate)), "empirical"
    base, mean_excess = _tail_fit(sorted_scores, tail)
    return base + mean_excess * math.log(tail / (n * rate)), "exponential tail"


def survival(sorted_scores: np.ndarray, threshold: float) -> float:
    """Estimated share of normal scores above ``threshold``: empirical inside the tail's base,
    the exponential tail model above it (the model of :func:`quantile_estimate`)."""
    n = sorted_scores.size
    tail = _tail_size(n)
    if tail is not None:
        base, mean_excess = _tail_fit(sorted_scores, tail)
        if threshold > base:
            return float(tail / n * math.exp(-(threshold - base) / mean_excess)) if mean_excess > 0 else 0.0
    return float(np.mean(sorted_scores > threshold))


def _tail_size(n: int) -> int | None:
    """``k``: the largest scores the tail model is fitted on; None when there are too few."""
    if n < 3:
        return None
    return min(n - 1, max(MIN_EXCEEDANCES, round(TAIL_SHARE * n)))


def _tail_fit(sorted_scores: np.ndarray, tail: int) -> tuple[float, float]:
    """Base ``u`` (the ``(k+1)``-th largest score) and mean excess ``beta`` of the ``k`` largest."""
    base = float(sorted_scores[-tail - 1])
    return base, float(np.mean(sorted_scores[-tail:] - base))
