"""Paired intervals (wus_tune.intervals) on scripted values: the numbers every claim and decision reads."""

from __future__ import annotations

import math
import statistics

import pytest

from wus_tune.intervals import Interval, decide, mean_difference, paired_differences, ratio_interval


def test_the_mean_difference_interval_is_students_t():
    values = [1.0, 2.0, 3.0, 4.0]
    iv = mean_difference(values)
    # t_{0.95, 3} = 2.3534; sd = 1.2910; half width = 2.3534 * 1.2910 / 2
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.half_width == pytest.approx(2.3534 * statistics.stdev(values) / 2, rel=1e-4)
    assert iv.low == pytest.approx(2.5 - iv.half_width) and iv.high == pytest.approx(2.5 + iv.half_width)


def test_one_value_has_no_interval_and_decides_nothing():
    iv = mean_difference([0.7])
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.7, -math.inf, math.inf, 1)
    assert decide(iv, 0.0) == "undecided" and decide(iv, 100.0) == "undecided"
    assert "no interval" in str(iv)


def test_pairing_removes_the_seed_to_seed_spread():
    # the baseline moves 8 points between seeds; the trial follows it a point below: paired, a tight -1
    baseline = [0.60, 0.68, 0.64]
    trial = [0.59, 0.67, 0.63]
    paired = paired_differences(trial, baseline, scale=100)
    unpaired_sd = statistics.stdev(trial + baseline) * 100
    assert paired.mean == pytest.approx(-1.0) and paired.half_width < 1e-9 < unpaired_sd
    with pytest.raises(ValueError, match="one baseline value each"):
        paired_differences([0.5], [0.5, 0.6])


def test_ratios_are_averaged_on_the_log_scale():
    iv = ratio_interval([2.0, 0.5])
    assert iv.mean == pytest.approx(1.0)  # twice as fast and twice as slow cancel
    assert iv.low < 1 < iv.high
    tight = ratio_interval([1.30, 1.32, 1.31, 1.29])
    assert tight.low > 1.25 and tight.high < 1.35
    assert decide(tight, 1.2) == "above" and decide(tight, 1.4) == "below" and decide(tight, 1.3) == "undecided"
    with pytest.raises(ValueError, match="positive finite"):
        ratio_interval([1.0, 0.0])


def test_interval_contains_and_serialises():
    iv = Interval(1.0, 0.5, 1.5, 3)
    assert iv.contains(0.5) and iv.contains(1.5) and not iv.contains(1.6)
    assert iv.to_dict() == {"mean": 1.0, "low": 0.5, "high": 1.5, "n": 3, "level": 0.9}
    assert mean_difference([1.0]).to_dict()["low"] is None  # infinite bounds are stored as null
