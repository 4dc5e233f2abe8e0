"""The fast deterministic check: how steering moves the first token of the reply.

Where a rubric declares a first-token signature (``first_token``: opening phrases of a positive
and of a negative reply, e.g. false-belief's "Yes / Indeed / Correct" vs "No / Actually / Not
quite"), one forward pass per prompt, with no sampling, tells which way a steering vector pushes:

1. Signature ids: the first token of each phrase tokenised on its own (no leading space, as a
   reply starts right after the chat template's generation prefix).
   A token that opens phrases of both sides says nothing and is dropped from both.
2. log-odds(prompt) = logsumexp_{t ∈ pos} log p(t) − logsumexp_{t ∈ neg} log p(t) at the first
   reply position, from the logits of the last prompt token.
3. Change = log-odds steered − log-odds unsteered, per prompt; a condition's value is the mean
   over prompts with a prompt-bootstrap interval.
4. Cost: steering at a hook point of layer L (resid_pre, attn_out, mlp_out, resid_post) changes
   nothing below L, so per prompt one clean forward records resid_pre of L (the layer's input)
   and the calls of layer L and those above (:mod:`latentaudit.models.upper`); each condition
   then reruns only those layers, with the steering hook adding v at the point, conditions
   stacked in the batch dimension. Where replaying the layers does not reproduce the clean
   logits (checked once per model), every row is a full forward with the steering hook instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.data.tokens import left_pad
from latentaudit.errors import LatentAuditError
from latentaudit.generate import last_logits_only
from latentaudit.models.forward import pad_id, require_finite
from latentaudit.models.hooks import (
    RowSteering,
    capture_layer_inputs,
    capture_resid,
    num_layers,
    steer_resid,
)
from latentaudit.models.load import LoadedModel

log = logging.getLogger(__name__)


class Signature(NamedTuple):
    """First-token ids of positive and of negative replies."""

    positive: tuple[int, ...]
    negative: tuple[int, ...]
    dropped: tuple[int, ...]
    """Ids that open phrases of both sides (left out of both)."""


def signature_ids(tokenizer, phrases: dict[str, Sequence[str]]) -> Signature:
    """The first token id of every phrase, split by side, ambiguous ids dropped."""
    first = {side: {_first_id(tokenizer, p) for p in phrases[side]}
             for side in ("positive", "negative")}
    both = first["positive"] & first["negative"]
    pos, neg = sorted(first["positive"] - both), sorted(first["negative"] - both)
    if not pos or not neg:
        raise LatentAuditError(
            "the rubric's first_token phrases leave no token on one side once the tokens "
            "opening phrases of both sides are dropped; give each side a distinct opening word.")
    return Signature(tuple(pos), tuple(neg), tuple(sorted(both)))


def _first_id(tokenizer, phrase: str) -> int:
    ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LatentAuditError(f"first_token phrase {phrase!r} has no tokens.")
    return int(ids[0])


def log_odds(logits: Float[Tensor, "batch vocab"], positive: Sequence[int],
             negative: Sequence[int]) -> Float[Tensor, " batch"]:
    """logsumexp of log p over ``positive`` ids minus the same over ``negative`` ids."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, V)
    pos = torch.logsumexp(logp[:, list(positive)], dim=-1)
    neg = torch.logsumexp(logp[:, list(negative)], dim=-1)
    return pos - neg


@torch.no_grad()
def next_token_logits(loaded: LoadedModel, prompts: Sequence[Sequence[int]],
                      steering: RowSteering | None = None) -> Float[Tensor, "batch vocab"]:
    """Logits of the token after each prompt (left-padded batch, optional per-row steering)."""
    pad = pad_id(loaded.tokenizer)
    batch = left_pad([list(p) for p in prompts], pad)
    dev = loaded.device
    with steer_resid(loaded.model, steering):
        out = loaded.model(input_ids=batch.input_ids.to(dev),
                           attention_mask=batch.attention_mask.to(dev),
                           position_ids=batch.position_ids.to(dev), use_cache=False,
                           **last_logits_only(loaded.model))
    return out.logits[:, -1].float().cpu()


@torch.no_grad()
def prompt_log_odds(loaded: LoadedModel, layer: int, prompt: Sequence[int],
                    vectors: Float[Tensor, "cond d_model"], sig: Signature, batch_size: int,
                    check: bool = False, point: str = "resid_post"
                    ) -> Float[Tensor, " cond"] | None:
    """Log-odds of one prompt under each steering vector added at ``point`` of ``layer``,
    rerunning only layer ``layer`` and those above (step 4). With ``check``: None when the
    replay does not match a clean forward."""
    from latentaudit.models.upper import replay_matches, upper_logits

    model, dev = loaded.model, loaded.device
    replayed = range(layer, num_layers(model))
    x = torch.tensor([list(prompt)], device=dev)
    with capture_resid(model, [layer], point="resid_pre") as store, \
            capture_layer_inputs(model, replayed) as calls:
        clean = model(input_ids=x, use_cache=False, **last_logits_only(model)).logits[:, -1:]
    h = store[layer]  # (1, T, D) the input of layer L
    if check and not replay_matches(model, layer - 1, h, calls, clean):
        return None
    out = []
    for start in range(0, len(vectors), batch_size):
        v = vectors[start:start + batch_size].to(h.device, h.dtype)  # (c, D)
        with steer_resid(model, RowSteering(layer, v, point)):
            logits = upper_logits(model, layer - 1, h.expand(len(v), -1, -1), calls, 1)[:, -1]
        require_finite(logits, "log-odds check: the steered next-token logits of a prompt", model)
        out.append(log_odds(logits.float().cpu(), sig.positive, sig.negative))
    return torch.cat(out)


def log_odds_grid(loaded: LoadedModel, layer: int, prompts: Sequence[Sequence[int]],
                  vectors: Float[Tensor, "cond d_model"], sig: Signature,
                  batch_size: int, point: str = "resid_post") -> Float[Tensor, "cond prompt"]:
    """Log-odds of every (condition, prompt): the upper-layers route, or full forwards."""
    C, P = len(vectors), len(prompts)
    first = prompt_log_odds(loaded, layer, prompts[0], vectors, sig, batch_size, check=True,
                            point=point)
    if first is None:
        log.info("replaying layer %d and those above does not match a full forward here: the "
                 "log-odds check runs full forwards", layer)
        rows = log_odds_rows(loaded, layer, prompts, vectors.repeat(P, 1),
                             torch.arange(P).repeat_interleave(C), sig, batch_size, point)
        return rows.view(P, C).T
    cols = [first]
    with progress(total=P, desc="log-odds check", unit="prompt", initial=1) as bar:
        for p in prompts[1:]:
            cols.append(prompt_log_odds(loaded, layer, p, vectors, sig, batch_size, point=point))
            bar.update(1)
    return torch.stack(cols, dim=1)  # (C, P)


def log_odds_rows(loaded: LoadedModel, layer: int, prompts: Sequence[Sequence[int]],
                  vectors: Float[Tensor, "rows d_model"], prompt_index: Int[Tensor, " rows"],
                  sig: Signature, batch_size: int, point: str = "resid_post"
                  ) -> Float[Tensor, " rows"]:
    """Log-odds of every (prompt_index[r], vectors[r]) row, ``batch_size`` rows per forward,
    each vector added at ``point`` of ``layer``."""
    out = []
    with progress(total=len(prompt_index), desc="log-odds check", unit="row") as bar:
        for start in range(0, len(prompt_index), batch_size):
            idx = prompt_index[start:start + batch_size]
            steering = RowSteering(layer, vectors[start:start + batch_size], point)
            logits = next_token_logits(loaded, [prompts[int(i)] for i in idx], steering)
            require_finite(logits, f"log-odds check: the next-token logits of rows {start + 1}"
                           f"–{start + len(idx)}", loaded.model)
            out.append(log_odds(logits, sig.positive, sig.negative))
            bar.update(len(idx))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def check(ctx, conds, ranking: Sequence[int], previous: Sequence[dict] = ()) -> list[dict]:
    """The log-odds change of every steered condition, plus each ``ranking`` latent at every
    direction and strength, on every held-out prompt (step 3 of the module docstring).
    ``previous`` rows (an earlier run's, same sweep settings) on the same prompts are kept."""
    from latentaudit.steer import stats
    from latentaudit.steer.config import Condition
    from latentaudit.steer.vectors import condition_vectors

    plan, cfg = ctx.plan, ctx.plan.cfg
    targets = {c.key: c for c in conds if c.method != "base"}
    for i in ranking:
        for direction in cfg.directions:
            model = "toward" if direction == "toward" and "toward" in ctx.models else "main"
            for s in cfg.strengths:
                sign = -1.0 if direction == "away" else 1.0
                c = Condition("ranking", (i,), direction, s,
                              sign * s * (ctx.rbar if ctx.rbar is not None else 1.0), model)
                targets.setdefault(c.key, c)
    pids = [p.prompt_id for p in plan.prompts][:cfg.logodds_prompts]
    kept = {r["key"]: r for r in previous if r.get("prompt_ids") == pids and r["key"] in targets}
    out = list(kept.values())
    for name, loaded in ctx.models.items():
        mine = [Condition("base", model=name)] + [c for c in targets.values()
                                                  if c.model == name and c.key not in kept]
        if len(mine) == 1:
            continue
        sig = signature_ids(loaded.tokenizer, plan.rubric.first_token)
        vecs = condition_vectors(mine, ctx.dirs)  # (C, D)
        P = len(pids)
        grid = log_odds_grid(loaded, plan.layer, [ctx.enc[name][p] for p in pids], vecs, sig,
                             cfg.forward_batch, plan.hook)  # (C, P)
        for c, row in zip(mine[1:], grid[1:] - grid[0], strict=True):
            sums, counts = row.numpy(), torch.ones(P, dtype=torch.float64).numpy()
            est = stats.ratio_estimate(sums, counts, stats.draw_weights(P, cfg.n_boot, cfg.seed),
                                       cfg.level)
            out.append({"key": c.key, "method": c.method, "latents": list(c.latents),
                        "direction": c.direction, "strength": c.strength, "alpha": c.alpha,
                        "model": name, "change": est.value, "ci": [est.lo, est.hi],
                        "n_prompts": P, "prompt_ids": pids,
                        "base_logodds": float(grid[0].mean()),
                        "signature": {"positive": list(sig.positive),
                                      "negative": list(sig.negative)}})
    return out
