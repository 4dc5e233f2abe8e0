"""Pure tensor functions of the top-activating-examples pass (see :mod:`.examples`).

- :func:`merge_topk` keeps, for every latent at once, the k largest positive activations seen so
  far with their place (sequence, position) and a context window of token ids and activations.
  A batch is merged into the running state by one top-k over [state, batch], so memory is
  bounded by d_sae × k × window whatever the corpus size. Exactly equal activations (the same
  context seen twice) go to the earlier place in the corpus (:func:`ordered_topk`), so streaming
  batch by batch, in any batch sizes, or merging parts scanned apart (:func:`merge_states`)
  keeps exactly what one top-k over the whole corpus keeps.
- :func:`update_density` counts, per latent, the tokens where it fires (activation > 0) and a
  histogram of those activations over fixed log-spaced bins (:data:`HIST_EDGES`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

HIST_EDGES = torch.logspace(-3, 3, 31, dtype=torch.float64)
"""Bin edges of the activation histogram: 30 bins of 0.2 decades from 1e-3 to 1e3. Bin j counts
activations v with edges[j] <= v < edges[j+1]; smaller positive values count in bin 0 and larger
ones in the last bin."""


class TopK(NamedTuple):
    """The k largest activations of every latent, largest first (empty slots: value −inf,
    sequence −1)."""

    values: Float[Tensor, "d_sae k"]
    sequence: Int[Tensor, "d_sae k"]
    """Index of the corpus sequence (in stream order)."""
    position: Int[Tensor, "d_sae k"]
    """Position of the activating token in its sequence."""
    window_ids: Int[Tensor, "d_sae k window"]
    """Token ids of positions position − before ... position + after (−1 outside the sequence)."""
    window_acts: Float[Tensor, "d_sae k window"]
    """The latent's activation at each window position (0 outside the sequence)."""


def empty_topk(d_sae: int, k: int, before: int, after: int, device=None) -> TopK:
    """A state that holds nothing yet."""
    w = before + 1 + after
    return TopK(torch.full((d_sae, k), float("-inf"), device=device),
                torch.full((d_sae, k), -1, dtype=torch.long, device=device),
                torch.full((d_sae, k), -1, dtype=torch.long, device=device),
                torch.full((d_sae, k, w), -1, dtype=torch.long, device=device),
                torch.zeros((d_sae, k, w), device=device))


def ordered_topk(x: Float[Tensor, "S n"], k: int) -> tuple[Float[Tensor, "S k"],
                                                           Int[Tensor, "S k"]]:
    """The k largest entries of each row, largest first, exactly equal values in the order of
    their column (the lower column first, and kept first at the cut). ``torch.topk`` alone
    leaves the order of ties unspecified; here it is fixed, so the result does not depend on
    how candidates were batched as long as columns follow corpus order. Ties at −inf (empty
    slots) are left in any order: callers mask them."""
    top = x.topk(k, dim=1)  # (S, k), sorted
    kth = top.values[:, -1:]  # (S, 1)
    need = k - (x > kth).sum(1)  # (S,) how many of the values equal to kth are kept
    ties = (x == kth).sum(1)  # (S,)
    index = top.indices
    cut = ((ties > need) & torch.isfinite(kth[:, 0])).nonzero()[:, 0]  # rows with a choice
    if len(cut):
        xr, kr = x[cut], kth[cut]  # (R, n), (R, 1)
        tie = xr == kr
        keep = (xr > kr) | (tie & (tie.cumsum(1) <= need[cut, None]))  # exactly k per row
        index = index.clone()
        index[cut] = keep.nonzero()[:, 1].view(len(cut), k)
    index = index.sort(dim=1).values  # column order, then a stable sort by value
    values = x.gather(1, index)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), index.gather(1, order)


def merge_topk(state: TopK, acts: Float[Tensor, "batch pos d_sae"],
               ids: Int[Tensor, "batch pos"], valid: Bool[Tensor, "batch pos"],
               sequence: Int[Tensor, " batch"], before: int, after: int) -> TopK:
    """``state`` with one batch merged in: per latent, the k largest positive activations at
    ``valid`` positions of the batch and of ``state``. ``sequence``: each row's sequence index."""
    B, T, S = acts.shape
    k = state.values.shape[1]
    acts = acts.float()
    score = acts.masked_fill(~valid[..., None], 0.0)  # (B, T, S)
    score = torch.where(score > 0, score, torch.full_like(score, float("-inf")))
    cand = torch.cat([state.values, score.reshape(B * T, S).T], dim=1)  # (S, k + B*T)
    values, indices = ordered_topk(cand, k)  # (S, k): the state is earlier in the corpus
    old = indices < k  # (S, k)
    slot = indices.clamp(max=k - 1)  # (S, k)
    flat = (indices - k).clamp(min=0)  # (S, k)
    b, t = flat // T, flat % T  # (S, k)

    w = before + 1 + after
    pad_acts = torch.nn.functional.pad(acts, (0, 0, before, after))  # (B, T + w - 1, S)
    pad_ids = torch.nn.functional.pad(ids, (before, after), value=-1)  # (B, T + w - 1)
    at = t[..., None] + torch.arange(w, device=acts.device)  # (S, k, w)
    latent = torch.arange(S, device=acts.device)[:, None, None]  # (S, 1, 1)
    new_acts = pad_acts[b[..., None], at, latent]  # (S, k, w)
    new_ids = pad_ids[b[..., None], at]  # (S, k, w)

    def pick(old_value: Tensor, new_value: Tensor) -> Tensor:
        mask = old.view(*old.shape, *([1] * (new_value.dim() - 2)))
        gathered = old_value.gather(1, slot.view(*slot.shape, *([1] * (old_value.dim() - 2)))
                                    .expand_as(new_value))
        return torch.where(mask, gathered, new_value)

    empty = torch.isinf(values)  # (S, k)
    seq = torch.where(empty, -1, pick(state.sequence, sequence.to(b.device)[b]))
    pos = torch.where(empty, -1, pick(state.position, t))
    win_ids = torch.where(empty[..., None], -1, pick(state.window_ids, new_ids))
    win_acts = torch.where(empty[..., None], 0.0, pick(state.window_acts, new_acts))
    return TopK(values, seq, pos, win_ids, win_acts)


class Density(NamedTuple):
    """How often each latent fires and how strongly."""

    fired: Int[Tensor, " d_sae"]
    """Tokens with activation > 0."""
    histogram: Int[Tensor, "d_sae bins"]
    """Counts of those activations per bin of :data:`HIST_EDGES`."""


def empty_density(d_sae: int, device=None) -> Density:
    bins = len(HIST_EDGES) - 1
    return Density(torch.zeros(d_sae, dtype=torch.long, device=device),
                   torch.zeros(d_sae, bins, dtype=torch.long, device=device))


def update_density(density: Density, acts: Float[Tensor, "rows d_sae"]) -> Density:
    """``density`` plus the firing counts and histogram of ``acts`` (one row per token)."""
    rows, latents = (acts > 0).nonzero(as_tuple=True)  # (F,), (F,)
    values = acts[rows, latents].double()  # (F,)
    bins = density.histogram.shape[1]
    edges = HIST_EDGES.to(values.device)[1:-1]  # inner edges
    which = torch.bucketize(values, edges, right=True)  # (F,) in 0..bins-1
    hist = density.histogram.flatten().index_add(
        0, latents * bins + which, torch.ones_like(which))
    fired = density.fired.index_add(0, latents, torch.ones_like(latents))
    return Density(fired, hist.view_as(density.histogram))


def merge_states(a: TopK, b: TopK) -> TopK:
    """The k largest of two states of the same latents, ``a`` of the earlier part of the corpus
    and ``b`` of the later one: exactly what one pass over both parts keeps."""
    k = a.values.shape[1]
    values, indices = ordered_topk(torch.cat([a.values, b.values], dim=1), k)  # (S, k)

    def pick(x: Tensor, y: Tensor) -> Tensor:
        both = torch.cat([x, y], dim=1)  # (S, 2k, ...)
        index = indices.view(*indices.shape, *([1] * (both.dim() - 2)))
        return both.gather(1, index.expand(-1, -1, *both.shape[2:]))

    return TopK(values, *(pick(x, y) for x, y in zip(a[1:], b[1:], strict=True)))


def add_density(a: Density, b: Density) -> Density:
    """The firing counts and histograms of two parts of the corpus together."""
    return Density(a.fired + b.fired, a.histogram + b.histogram)
