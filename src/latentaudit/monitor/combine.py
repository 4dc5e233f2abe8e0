"""A small logistic combination of latent reductions (or of the raw residual, the probe
ceiling), with the penalty chosen and the result measured on prompts held out.

1. Binary logistic regression is the two-class case of :func:`latentaudit.logistic.fit_logistic`
   (standardised features, L2 penalty λ, L-BFGS); its score is the logit difference, folded back
   onto raw features: w = (W₁ − W₀) / σ, b = (b₁ − b₀) − w·μ.
2. λ is chosen from a grid by the ROC AUC of prompt-held-out cross-validated scores (the
   larger λ on a tie).
3. Measurement never sees the test prompts: nested cross-validation (each outer fold's λ chosen
   by an inner cross-validation of its training prompts), or a fit on one set of prompts scored
   on another.
4. Cross-validated scores leave out each fold's intercept b₁ − b₀ (score = w·(x − μ)): the
   intercept follows the class balance of the training prompts, which, with whole prompts held
   out, runs opposite to the test fold's; pooled over folds it would push the AUC of an
   uninformative score below ½ (0.33 for constant inputs on the false-belief held-out set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentaudit.logistic import L2_GRID, fit_logistic, folds_by_group
from latentaudit.monitor.metrics import roc_auc


class Linear(NamedTuple):
    """score = x·weight + bias on raw features."""

    weight: Float[Tensor, " d_in"]
    bias: float
    l2: float
    intercept: float
    """b₁ − b₀ of the standardised fit (the part of ``bias`` set by the class balance)."""

    def score(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, " batch"]:
        return x.float() @ self.weight + self.bias

    def centred(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, " batch"]:
        """w·(x − μ): the score without the intercept, comparable across folds."""
        return self.score(x) - self.intercept


def fit_binary(x: Float[Tensor, "batch d_in"], y: Bool[Tensor, " batch"], l2: float) -> Linear:
    """The penalised logistic fit, standardisation folded into the weights."""
    w, b, mean, scale = fit_logistic(x, y.long(), 2, l2)
    weight = (w[1] - w[0]) / scale  # (d_in,)
    return Linear(weight, float(b[1] - b[0] - weight @ mean), l2, float(b[1] - b[0]))


def held_out_scores(x: Float[Tensor, "batch d_in"], y: Bool[Tensor, " batch"], l2: float,
                    folds: Sequence[Tensor]) -> Float[Tensor, " batch"]:
    """Each row's centred score under the fit without its fold."""
    scores = torch.empty(len(y))
    for test in folds:
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        scores[test] = fit_binary(x[train], y[train], l2).centred(x[test])
    return scores


class Choice(NamedTuple):
    """The λ picked by cross-validation and the held-out scores it was picked by."""

    l2: float
    scores: Float[Tensor, " batch"]
    auc: float


def choose_l2(x: Float[Tensor, "batch d_in"], y: Bool[Tensor, " batch"], groups: Sequence[str],
              l2s: Sequence[float] = L2_GRID, folds: int = 5) -> Choice:
    """The λ of the grid with the best prompt-held-out AUC (the larger one on a tie)."""
    split = folds_by_group(groups, folds)
    best: Choice | None = None
    for l2 in sorted(l2s, reverse=True):
        scores = held_out_scores(x, y, l2, split)
        auc = roc_auc(scores, y)
        if best is None or auc > best.auc:
            best = Choice(l2, scores, auc)
    assert best is not None
    return best


def fit_chosen(x: Float[Tensor, "batch d_in"], y: Bool[Tensor, " batch"], groups: Sequence[str],
               l2s: Sequence[float] = L2_GRID, folds: int = 5) -> tuple[Linear, Choice]:
    """λ by cross-validation, then the fit on every row."""
    choice = choose_l2(x, y, groups, l2s, folds)
    return fit_binary(x, y, choice.l2), choice


def nested_scores(x: Float[Tensor, "batch d_in"], y: Bool[Tensor, " batch"], groups: Sequence[str],
                  l2s: Sequence[float] = L2_GRID, folds: int = 5) -> Float[Tensor, " batch"]:
    """Every row scored by a model (and λ) chosen without its prompt."""
    scores = torch.empty(len(y))
    for test in folds_by_group(groups, folds):
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        sub = [g for g, keep in zip(groups, train.tolist(), strict=True) if keep]
        if y[train].all() or not y[train].any():  # one class left: nothing to learn
            scores[test] = 0.0
            continue
        model, _ = fit_chosen(x[train], y[train], sub, l2s, folds)
        scores[test] = model.centred(x[test])
    return scores


def transfer_scores(x_train: Float[Tensor, "train d_in"], y_train: Bool[Tensor, " train"],
                    groups_train: Sequence[str], x_test: Float[Tensor, "test d_in"],
                    l2s: Sequence[float] = L2_GRID, folds: int = 5) -> Float[Tensor, " test"]:
    """Fit on one set of prompts (λ by its own cross-validation), score another."""
    model, _ = fit_chosen(x_train, y_train, groups_train, l2s, folds)
    return model.score(x_test)
