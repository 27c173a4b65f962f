"""Paired statistics for a sweep: every method answers the same test items, so methods are compared item by item.

A method's scores form a matrix `[seeds, items]` (one row per training seed; an untrained baseline has one).
The difference of two methods is the mean over items of (mean over A's seeds - mean over B's seeds). Its 95%
interval comes from a seeded paired bootstrap: each resample draws the items with replacement (the same items
for both methods, which is what makes it paired) and, independently, each method's seeds with replacement, so
the interval covers both the test-set sampling noise and the seed-to-seed noise. Treating the two methods as
independent samples would add the item-difficulty variance twice and call real differences noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 1, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def as_matrix(scores: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """`[seeds, items]` as a float array; every seed must have scored the same items."""
    matrix = np.asarray(scores, dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"expected per-item scores shaped [seeds, items], got {matrix.shape}")
    return matrix


def _resampled_means(matrix: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each resample: the mean over resampled items of the mean over resampled seeds."""
    n_seeds = matrix.shape[0]
    seeds = rng.integers(0, n_seeds, size=(items.shape[0], n_seeds))
    per_item = matrix[seeds].mean(axis=1)  # [resamples, items]: each resample's own seed draw
    return np.take_along_axis(per_item, items, axis=1).mean(axis=1)


def paired_difference(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray, *,
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean of A minus mean of B over the same items, with its paired bootstrap interval (module docstring)."""
    a, b = as_matrix(a), as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores need the same items: {a.shape[1]} vs {b.shape[1]}")
    rng = np.random.default_rng(seed)
    items = rng.integers(0, a.shape[1], size=(resamples, a.shape[1]))
    diffs = _resampled_means(a, items, rng) - _resampled_means(b, items, rng)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return Interval(float(a.mean(axis=0).mean() - b.mean(axis=0).mean()), float(low), float(high))


def mean_interval(a: Sequence[Sequence[float]] | np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> Interval:
    """A method's mean score with its bootstrap interval (items and seeds resampled)."""
    a = as_matrix(a)
    return paired_difference(a, np.zeros((1, a.shape[1])), resamples=resamples, seed=seed, level=level)
