"""L2-penalised logistic regression with prompt-held-out cross-validation (shared by the probe
judge and the latent monitor).

1. Standardise each feature by the training part's mean μ and standard deviation σ
   (σ = 1 where a feature is constant): z = (x − μ) / σ.
2. Minimise mean cross-entropy of softmax(W z + b) + λ‖W‖²_F by L-BFGS from zero, in float64.
   The objective is convex, so the fit is deterministic.
3. Folds hold out whole groups (prompts): the distinct groups are split round-robin, in sorted
   order, into k folds, so a score is always measured on prompts the model did not see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentaudit.errors import LatentAuditError

L2_GRID = (0.03, 0.1, 0.3, 1.0)


def fit_logistic(x: Float[Tensor, "N D"], y: Int[Tensor, " N"], n_classes: int, l2: float,
                 max_iter: int = 500) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weight [C, D], bias [C], mean [D], scale [D]) of L2-penalised softmax regression."""
    x = x.double()
    mean = x.mean(0)  # (D,)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
    z = (x - mean) / scale  # (N, D)
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float(), mean.float(), scale.float()


def folds_by_group(groups: Sequence[str], k: int) -> list[Int[Tensor, " N"]]:
    """Test-set indices of k folds that each hold out whole groups (round-robin, sorted)."""
    distinct = sorted(set(groups))
    k = min(k, len(distinct))
    if k < 2:
        raise LatentAuditError("cross-validation needs labelled completions of at least two "
                               "prompts; label more prompts.")
    fold_of = {g: i % k for i, g in enumerate(distinct)}
    return [torch.tensor([n for n, g in enumerate(groups) if fold_of[g] == i]) for i in range(k)]


def held_out_logits(x: Float[Tensor, "N D"], y: Int[Tensor, " N"], n_classes: int, l2: float,
                    folds: Sequence[Tensor]) -> Float[Tensor, "N C"]:
    """Each completion's logits under the model fit without its fold."""
    out = torch.empty(len(y), n_classes)
    for test in folds:
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        w, b, mean, scale = fit_logistic(x[train], y[train], n_classes, l2)
        out[test] = ((x[test].float() - mean) / scale) @ w.T + b
    return out


def cross_validate(x: Float[Tensor, "N D"], y: Int[Tensor, " N"], n_classes: int, l2: float,
                   folds: Sequence[Tensor]) -> Int[Tensor, " N"]:
    """Held-out predictions: each completion predicted by the model fit without its fold."""
    return held_out_logits(x, y, n_classes, l2, folds).argmax(-1)
