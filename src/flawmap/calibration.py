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
  the ``(k+1)``-th largest ``u`` are modelled as exponential exceedances of scale ``beta``.
  Image scores of these methods are maxima over many patches, whose tails are light (the Gumbel
  domain), where the exponential is the limiting excess distribution; the generalised Pareto
  shape is not estimated because a few dozen scores cannot pin it down.

  Robust to one or two outliers among the scores (an odd good image, a mislabelled defect): the
  :data:`CENSORED_EXCESSES` = ``m`` largest excesses count as *censored*, known to exceed the
  next largest but not by how much. The censored sample's total excess
  ``T = (sum of the k - m smallest excesses) + m x (the (k - m)-th)`` is a sum of ``k - m``
  independent exponential spacings (``2 T / beta`` is chi-squared with ``2 (k - m)`` degrees)
  and does not move however large the ``m`` largest scores are. The plain mean excess let one
  score ten times the others' set the threshold (VisA capsules, PaDiM, 54 images: median score
  333, threshold 3953).

  Predictive, not plug-in: the threshold is the one a *new* normal image exceeds with
  probability ``r`` on average over the scores it was calibrated on. A new score exceeds ``u``
  with probability ``(k + 1) / (n + 1)`` on average (distribution-free), and its excess over
  ``T / (k - m)`` is F(2, 2 (k - m))-distributed, so
  ``P(S > u + x) = (k + 1) / (n + 1) (1 + x / T)^-(k - m)`` and
  ``threshold = u + T (((k + 1) / ((n + 1) r))^(1 / (k - m)) - 1)``. The plug-in
  ``u + beta ln(k / (n r))`` meets the rate in the median only: the rate is convex in the
  estimated ``beta``, so on average it is exceeded, the more the fewer the excesses (with 20
  images and a 5 % target, 15 % to 29 % of test/good on the three kept categories).

The smallest supported rate: the largest of ``n`` normal scores is exceeded by a new normal image
with probability ``1 / (n + 1)``, whatever the distribution; below that only the tail model says
where the threshold lies, and its error grows with the distance extrapolated. The tail model is
trusted down to ``1 / (MAX_EXTRAPOLATION (n + 1))`` (:func:`smallest_supported_rate`; a third of
the largest score's rate, so a 1 % target needs 33 normal images). A lower target is raised to
it, with a :class:`CalibrationWarning`, and the calibration records both rates.

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
#: Largest excesses of the tail model taken as censored (outliers cannot move it; module docstring).
CENSORED_EXCESSES = 2
#: How far below ``1 / (n + 1)`` (the largest score's rate) the tail model may set the rate.
MAX_EXTRAPOLATION = 3


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
        The target share of normal images above ``threshold``: the requested rate, or the
        smallest supported rate when the request was below it.
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
    requested_false_alarm_rate : float or None
        The rate asked for when it was below ``smallest_supported_rate`` (and raised to it), else None.
    smallest_supported_rate : float or None
        The smallest false-alarm rate ``n_scores`` normal scores support (:func:`smallest_supported_rate`);
        None in records saved before it was recorded.
    """

    threshold: float
    false_alarm_rate: float
    n_scores: int
    estimator: str
    threshold_interval: tuple[float, float]
    false_alarm_rate_interval: tuple[float, float]
    source: str
    requested_false_alarm_rate: float | None = None
    smallest_supported_rate: float | None = None

    def raised_note(self) -> str:
        """What messages add after the false-alarm rate (:func:`raised_rate_note`)."""
        return raised_rate_note(self.requested_false_alarm_rate, self.n_scores)

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


def raised_rate_note(requested: float | None, n_scores: int) -> str:
    """``" (asked for R: N normal images support no lower rate)"`` when the requested rate ``R``
    was raised to the smallest one ``n_scores`` support, else empty (``requested`` None)."""
    if requested is None:
        return ""
    return f" (asked for {requested:g}: {n_scores} normal images support no lower rate)"


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
    supported = smallest_supported_rate(scores.size)
    rate = max(false_alarm_rate, supported)
    if rate > false_alarm_rate:
        warnings.warn(
            f"a false-alarm rate of {false_alarm_rate:g} needs at least {images_needed(false_alarm_rate)} normal images; "
            f"{scores.size} support {supported:.3g} at best, so the threshold is set for {supported:.3g}; "
            "give more good images or run `flawmap calibrate`",
            CalibrationWarning,
            stacklevel=2,
        )
    threshold, estimator = quantile_estimate(scores, rate)
    rng = np.random.default_rng(random_state)
    resampled = np.sort(rng.choice(scores, size=(BOOTSTRAP_SAMPLES, scores.size), replace=True), axis=1)
    boot = np.array([quantile_estimate(row, rate)[0] for row in resampled])
    low, high = (float(v) for v in np.quantile(boot, [0.05, 0.95]))
    rates = (survival(scores, high), survival(scores, low))
    return Calibration(
        threshold=float(threshold),
        false_alarm_rate=float(rate),
        n_scores=int(scores.size),
        estimator=estimator,
        threshold_interval=(low, high),
        false_alarm_rate_interval=rates,
        source=source,
        requested_false_alarm_rate=float(false_alarm_rate) if rate > false_alarm_rate else None,
        smallest_supported_rate=supported,
    )


def smallest_supported_rate(n_scores: int) -> float:
    """The smallest false-alarm rate ``n_scores`` normal scores support: ``1 / (MAX_EXTRAPOLATION (n + 1))``
    (module docstring)."""
    return 1.0 / (MAX_EXTRAPOLATION * (n_scores + 1))


def images_needed(rate: float) -> int:
    """The fewest normal scores whose :func:`smallest_supported_rate` is at most ``rate``."""
    # the tolerance keeps a rate such as exactly 1 / 39 from rounding up past its 12 scores
    return max(1, math.ceil(1.0 / (MAX_EXTRAPOLATION * rate) - 1.0 - 1e-9))


def quantile_estimate(sorted_scores: np.ndarray, rate: float) -> tuple[float, str]:
    """The ``1 - rate`` quantile of ascending scores (n,) and the estimator's name."""
    n = sorted_scores.size
    tail = _tail_size(n)
    if n * rate >= MIN_EXCEEDANCES or tail is None or tail <= n * rate:
        return float(np.quantile(sorted_scores, 1.0 - rate)), "empirical"
    base, total_excess, kept = _tail_fit(sorted_scores, tail)
    return base + total_excess * (((tail + 1) / ((n + 1) * rate)) ** (1.0 / kept) - 1.0), "exponential tail"


def survival(sorted_scores: np.ndarray, threshold: float) -> float:
    """Estimated share of normal scores above ``threshold``: empirical inside the tail's base,
    the predictive tail model above it (the model of :func:`quantile_estimate`)."""
    n = sorted_scores.size
    tail = _tail_size(n)
    if tail is not None:
        base, total_excess, kept = _tail_fit(sorted_scores, tail)
        if threshold > base:
            if total_excess <= 0:
                return 0.0
            return float((tail + 1) / (n + 1) * (1.0 + (threshold - base) / total_excess) ** -kept)
    return float(np.mean(sorted_scores > threshold))


def _tail_size(n: int) -> int | None:
    """``k``: the largest scores the tail model is fitted on; None when there are too few."""
    if n < 3:
        return None
    return min(n - 1, max(MIN_EXCEEDANCES, round(TAIL_SHARE * n)))


def _tail_fit(sorted_scores: np.ndarray, tail: int) -> tuple[float, float, int]:
    """Base ``u`` (the ``(k+1)``-th largest score), total excess ``T`` of the ``k`` largest over it
    with the largest ``m`` censored, and ``k - m`` (module docstring)."""
    base = float(sorted_scores[-tail - 1])
    censored = min(CENSORED_EXCESSES, (tail - 1) // 2)
    kept = sorted_scores[-tail : sorted_scores.size - censored] - base  # the k - m smallest excesses
    return base, float(kept.sum() + censored * kept[-1]), kept.size
