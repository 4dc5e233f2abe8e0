"""Detection metrics of a score against binary labels (pure tensor functions).

1. ROC AUC = P(score of a random positive > score of a random negative), ties counting ½:
   the Mann–Whitney statistic (Σ ranks of positives − P(P+1)/2) / (P·N), with average ranks
   for tied scores (Hanley & McNeil 1982).
2. The ROC curve: (false-positive rate, true-positive rate) of the rule "flag when score ≥ t"
   at every distinct score t, from the highest down, starting at (0, 0).
3. Precision at recall r: the operating point of the highest threshold whose recall is ≥ r;
   its precision TP / (TP + FP) (and its threshold).
4. Confidence intervals by a cluster bootstrap: resample whole groups (prompts) with
   replacement, recompute the statistic, take the (1 ± level)/2 percentiles. Completions of
   one prompt are correlated, so resampling them one by one would give too narrow an interval.
   Resamples that hold only one class are left out (the statistic is undefined there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def average_ranks(x: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks (float64)."""
    order = x.argsort(stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()  # rank of the last member of each tie group
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks


def roc_auc(scores: Float[Tensor, " batch"], labels: Bool[Tensor, " batch"]) -> float:
    """Area under the ROC curve (NaN when one class is missing)."""
    labels = labels.bool()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = average_ranks(scores.double())
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Curve(NamedTuple):
    """A ROC curve: one point per distinct threshold, from the highest down."""

    fpr: Float[Tensor, " thresholds"]
    tpr: Float[Tensor, " thresholds"]
    thresholds: Float[Tensor, " thresholds"]
    """Threshold of each point (the first, (0, 0), has +inf)."""


def _cumulative(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(TP, FP, threshold) of "score ≥ t" at each distinct score t, highest first."""
    order = scores.double().argsort(descending=True, stable=True)
    s, y = scores.double()[order], labels.bool()[order]
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last position of each run of equal scores
    tp = y.double().cumsum(0)[last]
    fp = (~y).double().cumsum(0)[last]
    return tp, fp, s[last]


def roc_curve(scores: Float[Tensor, " batch"], labels: Bool[Tensor, " batch"]) -> Curve:
    """The ROC curve of ``scores`` (both classes must be present)."""
    tp, fp, t = _cumulative(scores, labels)
    zero = torch.zeros(1, dtype=torch.float64)
    return Curve(torch.cat([zero, fp / fp[-1]]), torch.cat([zero, tp / tp[-1]]),
                 torch.cat([torch.full((1,), math.inf, dtype=torch.float64), t]))


class OperatingPoint(NamedTuple):
    """Flag completions whose score is ≥ ``threshold``."""

    threshold: float
    precision: float
    recall: float


def precision_at_recall(scores: Float[Tensor, " batch"], labels: Bool[Tensor, " batch"],
                        recall: float) -> OperatingPoint:
    """The highest-threshold operating point whose recall is at least ``recall``."""
    tp, fp, t = _cumulative(scores, labels)
    n_pos = tp[-1]
    if n_pos == 0:
        return OperatingPoint(math.nan, math.nan, math.nan)
    i = int((tp >= recall * n_pos - 1e-9).nonzero()[0])
    return OperatingPoint(float(t[i]), float(tp[i] / (tp[i] + fp[i])), float(tp[i] / n_pos))


def bootstrap_indices(groups: Sequence[str], n: int, seed: int = 0) -> list[Int[Tensor, " rows"]]:
    """``n`` resamples of whole groups with replacement: the completion indices of each."""
    distinct = sorted(set(groups))
    members: dict[str, list[int]] = {g: [] for g in distinct}
    for i, g in enumerate(groups):
        members[g].append(i)
    index = [torch.tensor(members[g]) for g in distinct]
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(distinct), (n, len(distinct)), generator=gen)  # (n, G)
    return [torch.cat([index[j] for j in row.tolist()]) for row in draws]


class Interval(NamedTuple):
    """A percentile bootstrap interval."""

    low: float
    high: float
    n: int
    """Resamples it was computed from (those where the statistic is defined)."""


def bootstrap_ci(stat: Callable[[Tensor, Tensor], float], scores: Float[Tensor, " batch"],
                 labels: Bool[Tensor, " batch"], resamples: Sequence[Tensor],
                 level: float = 0.95) -> Interval:
    """Percentile interval of ``stat(scores[idx], labels[idx])`` over the resamples."""
    values = torch.tensor([stat(scores[idx], labels[idx]) for idx in resamples],
                          dtype=torch.float64)
    values = values[~values.isnan()]
    if len(values) == 0:
        return Interval(math.nan, math.nan, 0)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values, q).tolist()
    return Interval(low, high, len(values))
