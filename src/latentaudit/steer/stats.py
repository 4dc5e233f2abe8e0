"""Rates, paired differences and their bootstrap confidence intervals, clustered by prompt.

A condition's completions are graded positive (1), negative (0) or excluded (left out). Every
condition samples with the same per-(prompt, sample) seeds as its unsteered baseline (common
random numbers), so a unit (prompt, sample) has a steered and an unsteered outcome.

1. Rate: positives / decided (positive + negative) completions.
2. Paired difference: mean of y_steered − y_base over the units decided in both conditions.
3. Confidence interval: completions of one prompt are not independent, so the bootstrap
   resamples whole prompts (with replacement, C prompts per draw); each draw gives the ratio
   Σ_c w_c s_c / Σ_c w_c n_c of the per-prompt sums s_c and counts n_c with the prompt's draw
   count w_c. The interval is the percentile interval of the draws.
4. A method's mean effect over its latents gets a bootstrap interval over the latents.
5. Null band: the range [min, max] of the random latents' effects; a latent is beyond it when its
   effect lies outside, in the direction the steering intends (away: below, toward: above).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Estimate(NamedTuple):
    """A point estimate with its bootstrap interval and the number of units behind it."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int


def cluster_sums(values: Sequence[float], clusters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts (clusters in first-seen order)."""
    index: dict[str, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters], dtype=np.int64)
    sums = np.bincount(ids, weights=np.asarray(values, dtype=np.float64), minlength=len(index))
    counts = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums, counts


def draw_weights(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, C) how often each cluster is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    return np.stack([np.bincount(row, minlength=n_clusters) for row in idx]).astype(np.float64)


def ratio_estimate(sums: np.ndarray, counts: np.ndarray, weights: np.ndarray,
                   level: float = 0.95) -> Estimate:
    """Σ sums / Σ counts with the percentile interval over the bootstrap ``weights``."""
    n = int(counts.sum())
    if n == 0:
        return Estimate(None, None, None, 0)
    value = float(sums.sum() / n)
    num, den = weights @ sums, weights @ counts  # (n_boot,)
    ok = den > 0
    if not ok.any():
        return Estimate(value, None, None, n)
    draws = num[ok] / den[ok]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return Estimate(value, float(lo), float(hi), n)


def rate(outcomes: Sequence[int | None], clusters: Sequence[str], n_boot: int = 2000,
         seed: int = 0, level: float = 0.95) -> Estimate:
    """Share of 1s among the decided outcomes (None = excluded), prompt-clustered CI."""
    keep = [(y, c) for y, c in zip(outcomes, clusters, strict=True) if y is not None]
    if not keep:
        return Estimate(None, None, None, 0)
    sums, counts = cluster_sums([y for y, _ in keep], [c for _, c in keep])
    return ratio_estimate(sums, counts, draw_weights(len(sums), n_boot, seed), level)


def paired_difference(steered: Sequence[int | None], base: Sequence[int | None],
                      clusters: Sequence[str], n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """Mean of steered − base over units decided in both, prompt-clustered CI."""
    keep = [(s - b, c) for s, b, c in zip(steered, base, clusters, strict=True)
            if s is not None and b is not None]
    if not keep:
        return Estimate(None, None, None, 0)
    sums, counts = cluster_sums([d for d, _ in keep], [c for _, c in keep])
    return ratio_estimate(sums, counts, draw_weights(len(sums), n_boot, seed), level)


def mean_estimate(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> Estimate:
    """Mean of independent values (e.g. the latents of a method) with a percentile bootstrap."""
    if not values:
        return Estimate(None, None, None, 0)
    sums, counts = np.asarray(values, dtype=np.float64), np.ones(len(values))
    return ratio_estimate(sums, counts, draw_weights(len(values), n_boot, seed), level)


def null_band(effects: Sequence[float | None]) -> tuple[float, float] | None:
    """[min, max] of the random latents' effects (None when there are none)."""
    vals = [e for e in effects if e is not None]
    return (min(vals), max(vals)) if vals else None


def beyond_band(effect: float | None, band: tuple[float, float] | None, direction: str) -> bool:
    """Whether ``effect`` lies outside the null band on the side ``direction`` intends."""
    if effect is None or band is None:
        return False
    return effect < band[0] if direction == "away" else effect > band[1]
