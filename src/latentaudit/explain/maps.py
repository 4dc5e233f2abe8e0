"""Per-token attribution maps: which tokens of a completion a latent drives.

1. Sample pairs of the run (:func:`sample_pairs`: a seeded shuffle of the run's pairs) and take
   their completions, weighted within the sample as attribution weighs them:
   w_C = (#pairs with C positive − #pairs with C negative) / #pairs.
2. One forward and one backward per batch of completions, by the attribution stage's own
   :func:`~latentaudit.attribution.accumulate.forward_backward`, give a_t and g_t = ∂ℓ_C/∂a_t.
3. δ_{i,t} = −(g_t·d_i)((a_t − ā)·d_i) at every position the run summed (all, or only the
   completion's), zero elsewhere (:func:`token_map`). Σ_t δ_{i,t} = δ_i(C), and over every pair
   Σ_C w_C δ_i(C) is the run's Δ-attribution.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.attribution.accumulate import forward_backward
from latentaudit.attribution.math import token_deltas
from latentaudit.batching import guard_for, resolve_batch_size
from latentaudit.data.tokens import collate


def sample_pairs(pairs: Sequence[tuple[int, int]], n: int, seed: int) -> list[tuple[int, int]]:
    """The first ``n`` pairs (0: all) of a seeded shuffle of ``pairs``."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    return order[:n] if n else order


def pair_weights(pairs: Sequence[tuple[int, int]]) -> dict[int, float]:
    """{completion: w_C} within ``pairs`` (step 1)."""
    w: dict[int, float] = {}
    for p, q in pairs:
        w[p] = w.get(p, 0.0) + 1.0 / len(pairs)
        w[q] = w.get(q, 0.0) - 1.0 / len(pairs)
    return dict(sorted(w.items()))


def token_map(grads: Float[Tensor, "pos d_model"], acts: Float[Tensor, "pos d_model"],
              a_bar: Float[Tensor, " d_model"], directions: Float[Tensor, "n d_model"],
              mask: Bool[Tensor, " pos"]) -> Float[Tensor, "pos n"]:
    """δ_{i,t} at the positions in ``mask``, 0 elsewhere (step 3)."""
    return token_deltas(grads, acts, a_bar.to(acts.device), directions.to(acts.device)) \
        * mask[:, None]


class CompletionMap(NamedTuple):
    """One completion's tokens, loss and per-token δ of the chosen latents."""

    token_ids: list[int]
    """Prompt then completion token ids."""
    n_prompt: int
    loss: float
    """ℓ_C, the mean cross-entropy of the completion tokens."""
    deltas: dict[int, Tensor]
    """{layer: δ_{i,t} (T, n latents of that layer)} in float32 on the CPU."""


def completion_maps(loaded, seqs: Sequence[tuple[list[int], list[int]]],
                    directions: dict[int, Tensor], a_bars: dict[int, Tensor], positions: str,
                    batch_size: int, pad_id: int, points: dict[int, str] | None = None
                    ) -> list[CompletionMap]:
    """Step 2–3 for every (prompt ids, completion ids) in ``seqs``, in their order.

    ``batch_size`` 0: chosen from free device memory; a batch that runs out of it is mapped as
    two halves (:mod:`latentaudit.batching`), with the same maps.
    """
    layers = sorted(directions)
    order = sorted(range(len(seqs)), key=lambda j: (sum(map(len, seqs[j])), j))
    out: list[CompletionMap | None] = [None] * len(seqs)
    longest = max((sum(map(len, s)) for s in seqs), default=1)
    batch_size = resolve_batch_size(batch_size, loaded.model, loaded.device, "backward", longest,
                                    8, "attribution maps", logit_tokens=longest)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    guard = guard_for(loaded.model, "attribution maps")

    def one_slice(idx: list[int]) -> list[tuple[int, CompletionMap]]:
        batch = collate([seqs[j] for j in idx], pad_id).to(loaded.device)
        losses, per_layer = forward_backward(loaded.model, batch, layers, points=points)
        done = []
        for row, j in enumerate(idx):
            real = batch.attention_mask[row].bool()  # (T,)
            mask = real[real] if positions == "all" else batch.completion_mask[row][real]
            deltas = {L: token_map(g[row][real], a[row][real], a_bars[L], directions[L],
                                   mask).float().cpu()
                      for L, (a, g) in per_layer.items()}
            p, q = seqs[j]
            done.append((j, CompletionMap(p + q, len(p), float(losses[row]), deltas)))
        return done

    for idx in progress(batches, desc="attribution maps", unit="batch"):
        for part in guard.run(idx, one_slice):
            for j, m in part:
                out[j] = m
    return out


def map_summary(maps: Sequence[CompletionMap], positive: Sequence[bool], layer: int, column: int,
                tokens: Sequence[Sequence[str]], lines: Sequence[int], top: int = 10) -> dict:
    """Mean δ_i(C) over positive and negative completions, and the ``top`` completion tokens
    of positive completions with the largest δ_{i,t} (the tokens of the bad completions the
    latent drives; prompt positions stay in the full map)."""
    sums = [float(m.deltas[layer][:, column].sum()) for m in maps]
    pos = [s for s, p in zip(sums, positive, strict=True) if p]
    neg = [s for s, p in zip(sums, positive, strict=True) if not p]
    cands = [(float(m.deltas[layer][t, column]), c, t)
             for c, (m, p) in enumerate(zip(maps, positive, strict=True)) if p
             for t in range(m.n_prompt, len(m.token_ids))]
    best = sorted(cands, key=lambda x: -x[0])[:top]
    return {"mean_positive": sum(pos) / len(pos) if pos else None,
            "mean_negative": sum(neg) / len(neg) if neg else None,
            "top_tokens": [{"completion": c, "line": lines[c], "position": t,
                            "token": tokens[c][t], "delta": v} for v, c, t in best]}


def stack_maps(maps: Sequence[CompletionMap], columns: Sequence[tuple[int, int]]
               ) -> dict[str, Tensor]:
    """The arrays of ``token_maps.safetensors``: ``columns`` are (layer, latent) in column
    order, each layer's latents in the order its δ columns hold them."""
    offsets = [0]
    for m in maps:
        offsets.append(offsets[-1] + len(m.token_ids))
    by_layer: dict[int, int] = {}
    cols = []
    for L, _ in columns:
        cols.append((L, by_layer.get(L, 0)))
        by_layer[L] = by_layer.get(L, 0) + 1
    delta = torch.cat([torch.stack([m.deltas[L][:, c] for L, c in cols], dim=1)
                       for m in maps]) if maps else torch.zeros(0, len(cols))
    return {"token_delta": delta.float(),
            "token_ids": torch.tensor([t for m in maps for t in m.token_ids], dtype=torch.long),
            "offsets": torch.tensor(offsets, dtype=torch.long),
            "layers": torch.tensor([L for L, _ in columns], dtype=torch.long),
            "latents": torch.tensor([i for _, i in columns], dtype=torch.long)}
