"""Do two behaviours share their top latents? Top-K overlap against the overlap of chance.

For two rankings of the same N latents (two attribution runs on one SAE):

1. The overlap at K is |top_K(a) ∩ top_K(b)|, the top K by Δ-attribution of each run.
2. The null is two rankings unrelated to each other: a random ranking's top K is a uniformly
   random K-subset of the N latents, so the overlap X is hypergeometric (N latents, K marked,
   K drawn): P(X = x) = C(K, x) C(N − K, K − x) / C(N, K), mean K² / N.
3. The p-value is the chance of an overlap at least as large under that null, P(X ≥ x), summed
   exactly (Python integers, so any N).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor


class Overlap(NamedTuple):
    k: int
    overlap: int
    """How many latents are in both top-K lists."""
    expected: float
    """Mean overlap of two unrelated rankings, K² / N."""
    p_value: float
    """P(overlap ≥ observed) for two unrelated rankings."""
    shared: list[int]
    """The shared latents, in the first ranking's order."""


def top_indices(values: Float[Tensor, " d_sae"], k: int) -> list[int]:
    """The ``k`` largest entries' indices, largest first (ties to the lower index)."""
    order = torch.sort(values.float(), descending=True, stable=True).indices
    return order[:k].tolist()


def hypergeometric_tail(n_total: int, k: int, x: int) -> float:
    """P(X ≥ x) for the overlap X of two uniformly random ``k``-subsets of ``n_total``."""
    if x <= 0:
        return 1.0
    if x > k:
        return 0.0
    denom = math.comb(n_total, k)
    num = sum(math.comb(k, j) * math.comb(n_total - k, k - j) for j in range(x, k + 1))
    return num / denom


def topk_overlap(a: Float[Tensor, " d_sae"], b: Float[Tensor, " d_sae"], k: int) -> Overlap:
    """Steps 1-3 for two Δ-attribution vectors of one SAE."""
    if a.shape != b.shape:
        raise ValueError(f"the rankings cover {a.numel()} and {b.numel()} latents")
    n = a.numel()
    k = min(k, n)
    ta, tb = top_indices(a, k), set(top_indices(b, k))
    shared = [i for i in ta if i in tb]
    return Overlap(k=k, overlap=len(shared), expected=k * k / n,
                   p_value=hypergeometric_tail(n, k, len(shared)), shared=shared)
