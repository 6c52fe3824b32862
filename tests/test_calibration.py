"""Thresholds from normal scores: the quantile estimators, their uncertainty, and the warning."""

import numpy as np
import pytest

from flawmap.calibration import (
    MIN_RELIABLE_SCORES,
    Calibration,
    CalibrationWarning,
    calibrate_threshold,
    quantile_estimate,
    survival,
)
from flawmap.errors import FlawmapError


def normal_like(n: int, seed: int = 0) -> np.ndarray:
    """Gumbel scores: the distribution of a maximum over many patches."""
    return np.random.default_rng(seed).gumbel(loc=1.0, scale=0.1, size=n)


def test_many_scores_give_the_empirical_quantile():
    scores = normal_like(1000)
    calibration = calibrate_threshold(scores, 0.05, source="test")
    assert calibration.estimator == "empirical"
    assert calibration.threshold == pytest.approx(np.quantile(scores, 0.95))
    assert np.mean(scores > calibration.threshold) == pytest.approx(0.05, abs=0.002)


def achieved_rates(n: int, rate: float, draws: int = 60) -> np.ndarray:
    """The false-alarm rate on fresh normal scores of thresholds calibrated on ``draws`` samples of ``n``."""
    fresh = normal_like(200_000, seed=999)
    thresholds = [calibrate_threshold(normal_like(n, seed), rate, source="test").threshold for seed in range(draws)]
    return np.array([np.mean(fresh > threshold) for threshold in thresholds])


def test_a_rate_below_one_over_n_uses_the_tail_model_and_extrapolates():
    """With 40 scores a 1% rate lies above the largest score (the old rule stopped at the maximum,
    a rate near 1/41); the tail model meets the asked rate on average."""
    scores = normal_like(40)
    calibration = calibrate_threshold(scores, 0.01, source="test")
    assert calibration.estimator == "exponential tail" and calibration.threshold > scores.max()
    assert 0.005 <= np.mean(achieved_rates(40, 0.01)) <= 0.018


@pytest.mark.parametrize("n, rate", [(40, 0.05), (209, 0.01), (209, 0.05)])
def test_calibrated_thresholds_meet_the_rate_on_average(n, rate):
    achieved = achieved_rates(n, rate)
    assert rate * 0.7 <= np.median(achieved) <= rate * 1.3 and np.mean(achieved) <= rate * 1.5


def test_uncertainty_interval_brackets_the_threshold_and_narrows_with_more_scores():
    few = calibrate_threshold(normal_like(30), 0.05, source="test")
    many = calibrate_threshold(normal_like(3000), 0.05, source="test")
    for calibration in (few, many):
        low, high = calibration.threshold_interval
        assert low <= calibration.threshold <= high
        rate_low, rate_high = calibration.false_alarm_rate_interval
        assert rate_low <= 0.05 <= rate_high
    assert np.diff(many.threshold_interval)[0] < np.diff(few.threshold_interval)[0]


def test_few_scores_warn_and_many_do_not(recwarn):
    with pytest.warns(CalibrationWarning, match="only 5 normal images"):
        calibrate_threshold(normal_like(5), 0.05, source="test")
    calibrate_threshold(normal_like(MIN_RELIABLE_SCORES), 0.05, source="test")
    assert not [w for w in recwarn if issubclass(w.category, CalibrationWarning)]


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_rates_outside_zero_one_are_rejected(rate):
    with pytest.raises(FlawmapError, match="false_alarm_rate must be in"):
        calibrate_threshold(normal_like(30), rate, source="test")


def test_non_finite_scores_are_an_error():
    with pytest.raises(FlawmapError, match="not all finite"):
        calibrate_threshold(np.array([1.0, np.nan, 2.0] * 10), 0.05, source="test")


def test_survival_inverts_the_quantile():
    scores = np.sort(normal_like(60))
    for rate in (0.005, 0.01, 0.02):
        threshold, _ = quantile_estimate(scores, rate)
        assert survival(scores, threshold) == pytest.approx(rate, rel=1e-6)


def test_json_round_trip_and_malformed_record():
    calibration = calibrate_threshold(normal_like(30), 0.05, source="held-out")
    assert Calibration.from_json(calibration.to_json()) == calibration
    with pytest.raises(ValueError, match="malformed"):
        Calibration.from_json({"threshold": "high"})
