"""The exact mean-ablation effect of a latent, and how well the first-order δ ranks latents.

For completion C and latent i at layer L (METHOD.md, "A caution we measured"):

1. One clean forward records resid_post a_t of layer L, ℓ_C, and the calls of the layers above L
   (:mod:`latentaudit.models.upper`).
2. Mean ablation of latent i replaces its projection by ā's at every position the run summed
   (all, or only the completion's): a_t → a_t − ((a_t − ā)·d_i) d_i (:func:`ablate`). The
   latents go in the batch dimension, ``batch`` at a time.
3. Only the layers above L run again (:func:`~latentaudit.models.upper.upper_logits`), checked
   once per model against the clean logits; if the replay does not reproduce them, full forwards
   with a hook at layer L replace the output instead. Exact Δℓ_i(C) = ℓ_C(ablated) − ℓ_C, to be
   compared with δ_i(C), its first-order estimate (same sign: positive = the latent supports C).
4. Over sampled pairs, exact Δ_i = mean over pairs of Δℓ_i(C+) − Δℓ_i(C−), next to the
   first-order Δ of the same pairs; :func:`spearman` compares the two orders of the latents, per
   completion and over the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.attribution.loss import frozen_head, upper_completion_losses
from latentaudit.attribution.math import completion_losses
from latentaudit.models.forward import keep_logits
from latentaudit.models.hooks import capture_layer_inputs, capture_resid, layer_list, resid_hooks
from latentaudit.models.upper import replay_matches, upper_logits

ROUTES = ("upper-layers", "full-forward")


def ablate(hidden: Float[Tensor, "pos d_model"], a_bar: Float[Tensor, " d_model"],
           directions: Float[Tensor, "n d_model"], mask: Bool[Tensor, " pos"]
           ) -> Float[Tensor, "n pos d_model"]:
    """One copy of ``hidden`` per direction with that direction mean-ablated where ``mask``
    (computed in float32 at least, returned in ``hidden``'s dtype)."""
    h = hidden if hidden.dtype == torch.float64 else hidden.float()
    d = directions.to(h)  # (n, D)
    proj = ((h - a_bar.to(h)) @ d.T) * mask[:, None].to(h)  # (T, n)
    return (h[None] - proj.T[:, :, None] * d[:, None, :]).to(hidden.dtype)  # (n, T, D)


def average_ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 1..n of ``x`` (ascending), ties sharing the mean of their ranks."""
    x = x.double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in x.unique():
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation (Pearson of average ranks); nan when either is constant or
    n < 2."""
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / den) if den > 0 else float("nan")


class ExactChange(NamedTuple):
    """Exact mean-ablation effects of some latents of one layer on some completions."""

    clean: Float[Tensor, " completions"]
    """ℓ_C without ablation."""
    change: Float[Tensor, "completions n"]
    """ℓ_C(latent i mean-ablated) − ℓ_C."""
    route: str
    """upper-layers or full-forward (step 3)."""


@torch.no_grad()
def exact_changes(model, layer: int, seqs: Sequence[tuple[list[int], list[int]]],
                  directions: Float[Tensor, "n d_model"], a_bar: Float[Tensor, " d_model"],
                  positions: str, batch: int = 32, route: str | None = None,
                  point: str = "resid_post") -> ExactChange:
    """Steps 1–3 for every (prompt ids, completion ids) in ``seqs`` and every direction.

    ``route``: force upper-layers or full-forward (None: upper-layers when its check passes).
    ``point``: the hook point of ``layer`` ablated; only resid_post can replay the layers above
    (the others take full forwards).
    """
    route = route if point == "resid_post" else "full-forward"
    dev = next(model.parameters()).device
    upper = list(range(layer + 1, len(layer_list(model))))
    clean = torch.zeros(len(seqs), dtype=torch.float64)
    change = torch.zeros(len(seqs), len(directions), dtype=torch.float64)
    for c, (p, q) in enumerate(progress(seqs, desc=f"exact ablation L{layer}", unit="completion")):
        ids = torch.tensor([p + q], device=dev)  # (1, T)
        k = len(q)
        targets = ids[:, -k:]  # (1, k)
        kwargs = keep_logits(model, k + 1)
        with capture_resid(model, [layer], point=point) as store, \
                capture_layer_inputs(model, upper) as calls:
            last = model(input_ids=ids, use_cache=False, **kwargs).logits[:, -(k + 1):]
        ones = torch.ones_like(targets, dtype=torch.bool)
        clean[c] = completion_losses(last[:, :-1], targets, ones).double().item()
        hidden = store[layer]  # (1, T, D)
        if route is None:
            route = "upper-layers" if replay_matches(model, layer, hidden, calls, last) \
                else "full-forward"
        mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=dev)  # (T,)
        mask[len(p) if positions == "completion" else 0:] = True
        for s in range(0, len(directions), batch):
            dirs = directions[s:s + batch].to(dev)
            h = ablate(hidden[0], a_bar.to(dev), dirs, mask)  # (n, T, D)
            if route == "upper-layers" and frozen_head(model) is not None:
                lost = upper_completion_losses(model, layer, h, calls, targets[0])  # no logits
            else:
                out = (upper_logits(model, layer, h, calls, k + 1)[:, :-1]
                       if route == "upper-layers"
                       else full_forward_logits(model, layer, ids, h, k, point))  # (n, k, V)
                lost = completion_losses(out, targets.expand(len(h), -1),
                                         ones.expand(len(h), -1))
            change[c, s:s + len(h)] = lost.double().cpu() - clean[c]
    return ExactChange(clean, change, route or ROUTES[0])


def full_forward_logits(model, layer: int, ids: Tensor, hidden: Tensor, k: int,
                         point: str = "resid_post") -> Tensor:
    """Logits at the completion's predicting positions with ``point`` of layer L replaced."""
    kwargs = keep_logits(model, k + 1)
    with resid_hooks(model, {layer: lambda _: hidden}, point):
        out = model(input_ids=ids.expand(len(hidden), -1), use_cache=False, **kwargs).logits
    return out[:, -(k + 1):-1]


class ExactCheck(NamedTuple):
    """The exactness check of one layer (step 4)."""

    exact_delta: Float[Tensor, " n"]
    """Mean over the sampled pairs of Δℓ_i(C+) − Δℓ_i(C−)."""
    first_order_delta: Float[Tensor, " n"]
    """The same with δ_i(C) in place of Δℓ_i(C)."""
    rho: float
    """Spearman of exact_delta against first_order_delta over the latents."""
    rho_per_completion: list[float]
    """Spearman of Δℓ_i(C) against δ_i(C) over the latents, for each sampled completion."""


def exact_check(change: Float[Tensor, "completions n"], first: Float[Tensor, "completions n"],
                pairs: Sequence[tuple[int, int]]) -> ExactCheck:
    """Step 4 from per-completion exact and first-order changes; ``pairs`` index their rows."""
    pos = torch.tensor([p for p, _ in pairs])
    neg = torch.tensor([q for _, q in pairs])
    exact = (change[pos] - change[neg]).mean(0)
    approx = (first[pos].double() - first[neg].double()).mean(0)
    rho = [spearman(change[c], first[c]) for c in range(len(change))]
    return ExactCheck(exact, approx, spearman(exact, approx), rho)
