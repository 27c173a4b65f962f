"""Paired statistics on simulated scores: a paired interval sees what the independent rule calls noise, and it
covers a true difference of zero about 95% of the time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qatune.compare.stats import Interval, mean_interval, paired_difference


def _independent_rule_calls_it_noise(a: np.ndarray, b: np.ndarray) -> bool:
    """The rule `report.py` used before: noise when |difference| < 2 * hypot(stderr A, stderr B)."""
    stderr = lambda x: x.std(ddof=1) / math.sqrt(x.size)
    return abs(a.mean() - b.mean()) < 2 * math.hypot(stderr(a), stderr(b))


def test_correlated_scores_with_a_small_true_difference():
    """Per-question difficulty dominates both methods' scores; A is better by 1 point on every question. The
    independent rule drowns that in the spread of difficulty; the paired interval excludes zero."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 100, size=300)
    a = difficulty + 1.0 + rng.normal(0, 1, size=300)
    b = difficulty + rng.normal(0, 1, size=300)
    assert _independent_rule_calls_it_noise(a, b)
    interval = paired_difference([a], [b], resamples=2000, seed=1)
    assert interval.excludes_zero and interval.low > 0.5 and interval.high < 1.5
    assert interval.estimate == pytest.approx(a.mean() - b.mean())


def test_no_true_difference_is_covered_about_95_percent_of_the_time():
    rng = np.random.default_rng(42)
    simulations, covered = 600, 0
    for i in range(simulations):
        difficulty = rng.uniform(0, 1, size=200)  # a question's chance of being answered right
        a = (rng.uniform(size=200) < difficulty).astype(float)  # exchangeable methods: the same process
        b = (rng.uniform(size=200) < difficulty).astype(float)
        covered += not paired_difference([a], [b], resamples=1000, seed=i).excludes_zero
    assert 0.92 <= covered / simulations <= 0.98, covered / simulations


def test_seeds_are_resampled_too():
    """With seed-to-seed spread and no item noise, the interval must widen with the spread between seeds."""
    items = np.linspace(0, 1, 100)
    steady = paired_difference([items + 0.5, items + 0.5, items + 0.5], [items], seed=0)
    shaky = paired_difference([items, items + 0.5, items + 1.0], [items], seed=0)
    assert steady.estimate == pytest.approx(0.5) and shaky.estimate == pytest.approx(0.5)
    assert steady.high - steady.low < 1e-9 < shaky.high - shaky.low


def test_interval_of_a_mean_and_its_format():
    interval = mean_interval([[0.0, 1.0, 1.0, 0.0]], seed=0)
    assert interval.estimate == 0.5 and 0 <= interval.low < 0.5 < interval.high <= 1
    assert Interval(2.34, 0.81, 3.9).format() == "2.3 [0.8, 3.9]"
    assert Interval(-2.34, -3.9, -0.81).format(signed=True) == "-2.3 [-3.9, -0.8]"
    with pytest.raises(ValueError, match="same items"):
        paired_difference([[1.0, 2.0]], [[1.0]])
