"""Thresholds from normal scores: the quantile estimators, their uncertainty, and the warning."""

import numpy as np
import pytest

from flawmap.calibration import (
    MIN_RELIABLE_SCORES,
    Calibration,
    CalibrationWarning,
    calibrate_threshold,
    images_needed,
    quantile_estimate,
    smallest_supported_rate,
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
    """On average over calibrations (the tail model's threshold is predictive: module docstring)."""
    achieved = achieved_rates(n, rate)
    assert rate * 0.7 <= np.mean(achieved) <= rate * 1.3


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
        calibrate_threshold(normal_like(5), 0.1, source="test")
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


def with_outliers(scores: np.ndarray, n_outliers: int, factor: float = 10.0) -> np.ndarray:
    """``scores`` with its ``n_outliers`` largest values multiplied by ``factor``."""
    contaminated = np.sort(scores)
    contaminated[contaminated.size - n_outliers :] *= factor
    return contaminated


@pytest.mark.parametrize("n_outliers", [1, 2])
def test_one_or_two_outliers_do_not_move_the_tail_threshold(n_outliers):
    """Few scores, a rate that needs the tail model: the largest scores made ten times larger
    leave the threshold where it was."""
    clean = np.sort(normal_like(24))
    contaminated = with_outliers(clean, n_outliers)
    threshold, estimator = quantile_estimate(clean, 0.05)
    assert estimator == "exponential tail"
    assert quantile_estimate(contaminated, 0.05)[0] == pytest.approx(threshold, rel=1e-12)
    calibration = calibrate_threshold(contaminated, 0.05, source="test")
    assert calibration.threshold == pytest.approx(threshold, rel=1e-12)
    assert calibration.threshold_interval[0] <= threshold <= calibration.threshold_interval[1]


def test_thresholds_from_twenty_scores_with_an_outlier_meet_the_rate_on_average():
    """20 scores, one of them ten times too large: the 5 % threshold still flags 5 % of fresh
    normal scores on average (the mean excess let the outlier push it far past the data)."""
    fresh = normal_like(200_000, seed=999)
    achieved = np.array([
        np.mean(fresh > calibrate_threshold(with_outliers(normal_like(20, seed), 1), 0.05, source="test").threshold)
        for seed in range(60)
    ])
    assert 0.035 <= np.mean(achieved) <= 0.065


def test_a_rate_the_scores_cannot_support_is_raised_to_the_smallest_supported_one():
    scores = normal_like(20)
    with pytest.warns(CalibrationWarning, match="needs at least 33 normal images"):
        calibration = calibrate_threshold(scores, 0.01, source="test")
    supported = smallest_supported_rate(20)
    assert calibration.false_alarm_rate == supported > 0.01
    assert calibration.requested_false_alarm_rate == 0.01 and calibration.smallest_supported_rate == supported
    assert calibration.threshold == pytest.approx(quantile_estimate(np.sort(scores), supported)[0])
    assert calibration.threshold < scores.max() + 3 * (scores.max() - np.median(scores))  # no far extrapolation
    assert calibrate_threshold(scores, 0.05, source="test").requested_false_alarm_rate is None


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.013, 0.05])
def test_images_needed_is_the_fewest_that_support_a_rate(rate):
    n = images_needed(rate)
    assert smallest_supported_rate(n) <= rate < smallest_supported_rate(n - 1)


def test_records_saved_before_the_supported_rate_was_recorded_load():
    document = calibrate_threshold(normal_like(30), 0.05, source="held-out").to_json()
    del document["requested_false_alarm_rate"], document["smallest_supported_rate"]
    calibration = Calibration.from_json(document)
    assert calibration.smallest_supported_rate is None and calibration.requested_false_alarm_rate is None
