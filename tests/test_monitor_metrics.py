"""Monitor metrics, combination and reductions on hand-built tensors, against direct
computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentaudit.monitor.combine import fit_binary, nested_scores
from latentaudit.monitor.metrics import (
    average_ranks,
    bootstrap_ci,
    bootstrap_indices,
    precision_at_recall,
    roc_auc,
    roc_curve,
)
from latentaudit.monitor.read import reduce_completions


def pairwise_auc(scores, labels) -> float:
    """P(positive > negative) + ½ P(tie), by counting every pair."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def scored(seed: int, n: int = 40, ties: bool = True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < 0.6
    scores = torch.randn(n, generator=g) + labels.float()
    if ties:
        scores = (scores * 2).round() / 2  # many tied scores
    return scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_is_the_pairwise_probability(seed):
    scores, labels = scored(seed)
    assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores.tolist(),
                                                                 labels.tolist()), abs=1e-12)


def test_auc_by_hand():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([False, False, True, True])
    assert roc_auc(s, y) == pytest.approx(0.75)  # the classic example: 3 of 4 pairs ordered
    assert roc_auc(torch.ones(4), y) == 0.5
    assert math.isnan(roc_auc(s, torch.ones(4, dtype=torch.bool)))


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("seed", [0, 3])
def test_roc_curve_area_is_the_auc(seed):
    scores, labels = scored(seed)
    c = roc_curve(scores, labels)
    area = float(torch.trapezoid(c.tpr, c.fpr))
    assert area == pytest.approx(roc_auc(scores, labels), abs=1e-12)
    assert c.fpr[0] == 0 and c.tpr[-1] == 1 and (c.fpr.diff() >= 0).all()


@pytest.mark.parametrize(("seed", "recall"), [(0, 0.5), (1, 0.8), (2, 0.9), (3, 1.0)])
def test_precision_at_recall_is_the_highest_threshold_reaching_it(seed, recall):
    scores, labels = scored(seed)
    n_pos = int(labels.sum())
    best = None
    for t in sorted(set(scores.tolist()), reverse=True):  # direct sweep, highest first
        flag = scores >= t
        tp = int((flag & labels).sum())
        if tp / n_pos >= recall - 1e-12:
            best = (t, tp / int(flag.sum()), tp / n_pos)
            break
    op = precision_at_recall(scores, labels, recall)
    assert (op.threshold, op.precision, op.recall) == pytest.approx(best)


def test_precision_at_recall_by_hand():
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    y = torch.tensor([True, False, True, False, True])
    op = precision_at_recall(s, y, 2 / 3)
    assert op == pytest.approx((0.7, 2 / 3, 2 / 3))


def test_bootstrap_resamples_whole_prompts_and_matches_a_direct_computation():
    scores, labels = scored(5, n=36)
    groups = [f"p{i % 9}" for i in range(36)]
    resamples = bootstrap_indices(groups, 200, seed=7)
    # direct: the same draws of prompts, every pair counted, numpy's linear percentile
    gen = torch.Generator().manual_seed(7)
    draws = torch.randint(9, (200, 9), generator=gen)
    distinct = sorted(set(groups))
    values = []
    for row, idx in zip(draws.tolist(), resamples, strict=True):
        members = [i for j in row for i in range(36) if groups[i] == distinct[j]]
        assert idx.tolist() == members
        y = [bool(labels[i]) for i in members]
        if all(y) or not any(y):
            continue
        values.append(pairwise_auc([float(scores[i]) for i in members], y))
    ci = bootstrap_ci(roc_auc, scores, labels, resamples, level=0.9)
    assert ci.n == len(values)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(values, [5, 95])), abs=1e-12)


def test_fit_binary_folds_the_standardisation_into_the_weights():
    from latentaudit.logistic import fit_logistic

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1]) + 5
    y = x[:, 0] + torch.randn(50, generator=g) > 5
    lin = fit_binary(x, y, 0.1)
    w, b, mean, scale = fit_logistic(x, y.long(), 2, 0.1)
    logits = ((x - mean) / scale) @ w.T + b
    assert torch.allclose(lin.score(x), logits[:, 1] - logits[:, 0], atol=1e-4)


def test_nested_scores_never_see_held_out_labels():
    from latentaudit.logistic import folds_by_group

    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g)
    y = x[:, 0] > 0
    groups = [f"p{i % 8}" for i in range(48)]
    scores = nested_scores(x, y, groups, l2s=(0.1, 1.0), folds=4)
    fold = folds_by_group(groups, 4)[0]
    y2 = y.clone()
    y2[fold] = ~y2[fold]
    assert torch.equal(nested_scores(x, y2, groups, l2s=(0.1, 1.0), folds=4)[fold], scores[fold])
    assert roc_auc(scores, y) > 0.9


def test_uninformative_inputs_score_one_half_under_cross_validation():
    # whole prompts held out: each training part's class balance runs opposite to its test
    # fold's, so per-fold intercepts alone would rank the folds (an AUC far from ½)
    groups = [f"p{i}" for i in range(8) for _ in range(6)]
    y = torch.tensor([j < (1 + i % 5) for i in range(8) for j in range(6)])
    scores = nested_scores(torch.ones(48, 2), y, groups, l2s=(0.1,), folds=4)
    assert roc_auc(scores, y) == 0.5


class Identity:
    """An "SAE" whose latents are the activations themselves (clamped at 0)."""

    W_enc = torch.zeros(1)

    def encode(self, x):
        return x.clamp_min(0)


def test_reductions_over_completion_tokens_by_hand():
    acts = torch.tensor([[[1.0, -1.0], [2.0, 0.0], [4.0, 3.0]],
                         [[9.0, 9.0], [0.0, 5.0], [2.0, 1.0]]])  # (B=2, T=3, D=2)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    red = reduce_completions(acts, mask, Identity())
    assert red.latent_mean.tolist() == [[3.0, 1.5], [2.0, 1.0]]
    assert red.latent_max.tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert red.resid_mean.tolist() == [[3.0, 1.5], [2.0, 1.0]]
    only = reduce_completions(acts, mask, Identity(), torch.tensor([1]))
    assert only.latent_mean.tolist() == [[1.5], [1.0]] and only.latent_max.tolist() == [[3.0],
                                                                                          [1.0]]
