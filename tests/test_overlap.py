"""Top-K overlap of two rankings against its chance distribution, checked by direct count and
by simulating random rankings."""

from __future__ import annotations

import math

import pytest
import torch

from latentaudit.explain.overlap import hypergeometric_tail, top_indices, topk_overlap


def test_tail_by_hand():
    # N = 5, K = 2: P(X = 0) = C(3,2)/C(5,2) = 3/10, P(X = 2) = 1/10
    assert hypergeometric_tail(5, 2, 0) == 1.0
    assert hypergeometric_tail(5, 2, 1) == pytest.approx(7 / 10)
    assert hypergeometric_tail(5, 2, 2) == pytest.approx(1 / 10)
    assert hypergeometric_tail(5, 2, 3) == 0.0


def test_overlap_by_direct_count():
    a = torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0])  # top 3: 0, 2, 4
    b = torch.tensor([0.0, 6.0, 5.0, 1.0, 4.0, 2.0])  # top 3: 1, 2, 4
    o = topk_overlap(a, b, 3)
    assert (o.k, o.overlap, o.shared) == (3, 2, [2, 4])
    assert o.expected == pytest.approx(9 / 6)
    want = sum(math.comb(3, j) * math.comb(3, 3 - j) for j in (2, 3)) / math.comb(6, 3)
    assert o.p_value == pytest.approx(want)
    assert topk_overlap(a, a, 6).overlap == 6


def test_ties_go_to_the_lower_index():
    assert top_indices(torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0]), 2) == [1, 2]


def test_null_matches_random_rankings():
    n, k, trials = 200, 20, 4000
    g = torch.Generator().manual_seed(0)
    fixed = torch.randn(n, generator=g)
    overlaps = torch.tensor([topk_overlap(fixed, torch.randn(n, generator=g), k).overlap
                             for _ in range(trials)], dtype=torch.float64)
    assert overlaps.mean().item() == pytest.approx(k * k / n, abs=0.08)
    for x in (3, 4, 6):
        simulated = (overlaps >= x).double().mean().item()
        assert simulated == pytest.approx(hypergeometric_tail(n, k, x), abs=0.025)
