"""What a latent's direction does to the model's output through the layers above it.

An output-centric description (Gur-Arieh et al. 2025): where the logit lens reads a decoder
direction through the unembedding alone, this runs it through the layers above L and reads the
tokens whose log-probability moves. For a latent i at layer L (unit decoder row d_i), on fixed
reference sequences (prompt and reply: the run's sampled completions):

1. One clean forward records the hook point h_t of layer L, the calls of the layers above L and
   the clean log-probabilities at the positions that predict the reply's tokens.
2. Two edits at every position (:func:`add_direction`, :func:`~.exact.ablate`): *added*,
   h_t + α d_i, with α a multiple of the mean residual norm (steering's unit); *ablated*, mean
   ablation h_t − ((h_t − ā)·d_i) d_i.
3. Only the layers above L run again, the latents in the batch dimension, as the exact check
   does (full forwards with a hook where the replay does not reproduce the clean logits).
4. Per latent and edit (:func:`logprob_shift`): Δ log p(v), the mean over the reply positions of
   every sequence of log p'(v) − log p(v); :func:`moved_tokens` lists the tokens that rise and
   fall most.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.explain.exact import ablate, full_forward_logits
from latentaudit.models.forward import keep_logits, require_finite
from latentaudit.models.hooks import capture_layer_inputs, capture_resid, layer_list
from latentaudit.models.upper import replay_matches, upper_normed


class OutputEffect(NamedTuple):
    """Mean log-probability shifts of some latents of one layer (step 4)."""

    added: Float[Tensor, "n vocab"]
    """Δ log p per token when α d_i is added at every position."""
    ablated: Float[Tensor, "n vocab"]
    """Δ log p per token when latent i is mean-ablated at every position."""
    alpha: float
    positions: int
    """Reply positions averaged over."""
    route: str
    """upper-layers or full-forward (step 3)."""


SHIFT_BYTES = 1 << 24
"""Bytes of each float64 (positions × vocabulary) temporary of :func:`logprob_shift`."""


def add_direction(hidden: Float[Tensor, "pos d_model"], directions: Float[Tensor, "n d_model"],
                  alpha: float) -> Float[Tensor, "n pos d_model"]:
    """One copy of ``hidden`` per direction with α·direction added at every position."""
    return (hidden[None].float() + alpha * directions[:, None, :].float()).to(hidden.dtype)


def logprob_shift(clean: Float[Tensor, "pos vocab"], edited: Float[Tensor, "n pos vocab"]
                  ) -> Float[Tensor, "n vocab"]:
    """Σ over positions of log softmax(edited) − log softmax(clean), in float64, a few
    positions at a time (about :data:`SHIFT_BYTES` of float64 per temporary)."""
    rows = max(1, SHIFT_BYTES // (8 * clean.shape[-1]))
    out = torch.zeros(edited.shape[0], clean.shape[-1], dtype=torch.float64,
                      device=clean.device)  # (n, V)
    for s in range(0, clean.shape[0], rows):
        base = clean[s:s + rows].double().log_softmax(-1)  # (rows, V)
        for i, e in enumerate(edited):
            out[i] += (e[s:s + rows].double().log_softmax(-1) - base).sum(0)
    return out


def moved_tokens(shift: Float[Tensor, " vocab"], tokenizer, top: int) -> dict[str, list[dict]]:
    """The ``top`` tokens whose log-probability rises most and falls most under ``shift``."""
    from latentaudit.models.lens import token_strings

    def listed(ids: Tensor) -> list[dict]:
        ids = ids.tolist()
        return [{"token": t, "token_id": i, "value": float(shift[i])}
                for t, i in zip(token_strings(tokenizer, ids), ids, strict=True)]

    k = min(top, shift.numel())
    return {"rises": listed(shift.topk(k).indices), "falls": listed((-shift).topk(k).indices)}


@torch.no_grad()
def output_effects(model, layer: int, seqs: Sequence[tuple[list[int], list[int]]],
                   directions: Float[Tensor, "n d_model"], a_bar: Float[Tensor, " d_model"],
                   alpha: float, batch: int = 4, route: str | None = None,
                   point: str = "resid_post") -> OutputEffect:
    """Steps 1–4 for every (prompt ids, reply ids) in ``seqs`` and every direction.

    ``batch``: latents per replay (each holds [batch, reply, vocab] logits). ``route``: force
    upper-layers or full-forward (None: upper-layers when its check passes).
    """
    route = route if point == "resid_post" else "full-forward"
    dev = next(model.parameters()).device
    upper = list(range(layer + 1, len(layer_list(model))))
    n = len(directions)
    sums = {"added": torch.zeros(n, model.get_output_embeddings().weight.shape[0],
                                 dtype=torch.float64)}
    sums["ablated"] = sums["added"].clone()
    positions = 0
    head = model.get_output_embeddings()
    for p, q in progress(seqs, desc=f"output effect L{layer}", unit="completion"):
        ids = torch.tensor([p + q], device=dev)  # (1, T)
        k = len(q)
        with capture_resid(model, [layer], point=point) as store, \
                capture_layer_inputs(model, upper) as calls:
            last = model(input_ids=ids, use_cache=False, **keep_logits(model, k + 1)
                         ).logits[:, -(k + 1):]
        hidden = store[layer]  # (1, T, D)
        if route is None:
            route = "upper-layers" if replay_matches(model, layer, hidden, calls, last) \
                else "full-forward"
        everywhere = torch.ones(ids.shape[1], dtype=torch.bool, device=dev)
        for s in range(0, n, batch):
            dirs = directions[s:s + batch].to(dev)
            edits = {"added": add_direction(hidden[0], dirs, alpha),
                     "ablated": ablate(hidden[0], a_bar.to(dev), dirs, everywhere)}
            for name, h in edits.items():  # (b, T, D)
                if route == "upper-layers":  # one latent's logits at a time: (k, V)
                    normed = upper_normed(model, layer, h, calls, k + 1)[:, :-1]  # (b, k, D)
                    shift = torch.cat([logprob_shift(last[0, :-1], head(row)[None])
                                       for row in normed])
                else:
                    shift = logprob_shift(last[0, :-1],
                                          full_forward_logits(model, layer, ids, h, k, point))
                sums[name][s:s + len(h)] += shift.cpu()
        positions += k
    for name, total in sums.items():
        require_finite(total, f"explain: the output effect of layer {layer} ({name} latents)",
                       model)
    scale = 1.0 / max(positions, 1)
    return OutputEffect(sums["added"] * scale, sums["ablated"] * scale, float(alpha), positions,
                        route or "upper-layers")
