"""The generation loop of ``latentaudit sample``: batched, KV-cached, seeded per row.

Algorithm (one batch of prompts, each with its own seed):

1. Left-pad the prompt ids; position ids are ``cumsum(attention_mask) - 1`` so a padded row
   computes what it would alone. One forward pass fills the KV cache (prefill); rows with the
   same prompt and steering vector (several samples of one prompt) are prefilled once and
   their cache rows copied.
2. Per step and row: softmax(logits / temperature); with ``top_p`` < 1 keep the smallest
   top-probability set whose mass reaches ``top_p`` (stable sort; only the 256 most probable
   tokens are sorted when they hold the set, the same result as sorting all). Draw
   ``u ~ U[0, 1)`` from the row's own CPU generator and take the token where the kept
   cumulative mass first exceeds ``u · mass`` (inverse CDF, float64). Temperature 0 is greedy
   (argmax). A row's draws depend only on its seed, never on batch size or batch neighbours:
   its n-th token uses its generator's n-th draw, all ``max_new_tokens`` of them drawn before
   the loop (one call per row, the same numbers as one call per step) and sent to the device
   once, so no step waits on the host for random numbers.
3. Feed the new tokens with the cache (a :class:`~latentaudit.models.hooks.RowSteering` adds
   its row's vector at the prefill and at every step, and follows the rows that remain); a row
   stops at an EOS id (``finish_reason`` "eos"), when
   its decoded text contains a stop string ("stop") or after ``max_new_tokens`` ("length").
   Finished rows leave the cache. The new ids go to the host once per step (to check EOS and
   stop strings, and a row whose logits are NaN or inf, which stops with an error rather than
   sample noise); masks, positions and the next input stay on the device.
4. A batch that runs out of device memory is generated as two halves
   (:class:`~latentaudit.batching.BatchGuard`): rows are independent, so the completions are
   the same.

Token ids (what attribution conditions on): a generation's ``token_ids`` are exactly those the
model generated, no padding, nothing after the end. With "eos" the EOS id is KEPT as the last id
(stopping is part of what the model chose; its loss belongs to the completion) and the text is
the decoding of the ids before it. With "stop" the ids are cut to the longest prefix whose
decoding ends before the stop string, and the text is that decoding (a token that straddles the
stop string is dropped whole). So ``text == decode(token_ids[:-1] if eos else token_ids)``.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentaudit.batching import guard_for
from latentaudit.data.tokens import left_pad
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import keep_logits, not_finite_why, pad_id
from latentaudit.models.hooks import RowSteering, layer_device, steer_resid
from latentaudit.models.load import LoadedModel


class Sampling(Protocol):
    """The options generation reads (those of :class:`latentaudit.sample.SampleConfig`)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...]


class Generation(NamedTuple):
    """One generated completion."""

    token_ids: list[int]
    """Generated ids; ends with the EOS id when ``finish_reason`` is "eos"."""
    text: str
    """Decoded completion, without the EOS token and without the stop string."""
    finish_reason: str
    """"stop", "eos" or "length"."""


# ---- the math --------------------------------------------------------------------------------

def sample_tokens(logits: Float[Tensor, "batch vocab"], uniforms: Float[Tensor, " batch"],
                  temperature: float, top_p: float) -> Int[Tensor, " batch"]:
    """Temperature + top-p sampling by inverse CDF of each row's uniform (argmax if T = 0).

    With top_p = 1 the CDF runs in vocabulary order; otherwise over the probabilities sorted
    descending (stable), cut to the smallest prefix whose mass reaches top_p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    if top_p >= 1:
        return _inverse_cdf(probs, uniforms)
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)  # (B,)
    short, order, ok = _top_candidates(probs, top_p)  # (B, K) each, (B,)
    uniforms = uniforms.to(probs.device)
    if ok.all():  # the usual case: one pass over the candidates, no selection
        pick = _inverse_cdf(_cut_top_p(short, top_p), uniforms)
        return order.gather(-1, pick[:, None]).squeeze(-1)
    if ok.any():
        pick = _inverse_cdf(_cut_top_p(short[ok], top_p), uniforms[ok])
        picked[ok] = order[ok].gather(-1, pick[:, None]).squeeze(-1)
    # a flat row: the top-p set reaches past the candidates, sort it all
    full, order = probs[~ok].sort(dim=-1, descending=True, stable=True)  # (b, V)
    pick = _inverse_cdf(_cut_top_p(full, top_p), uniforms[~ok])
    picked[~ok] = order.gather(-1, pick[:, None]).squeeze(-1)
    return picked


TOP_P_CANDIDATES = 256
"""Tokens sorted per row for top-p; a row whose top-p set does not fit is sorted whole."""


def _top_candidates(probs: Float[Tensor, "batch vocab"], top_p: float
                    ) -> tuple[Float[Tensor, "batch k"], Int[Tensor, "batch k"], Tensor]:
    """The K most probable tokens per row in stable-sort order, and whether they suffice.

    Ties are ordered by token id, as a stable descending sort of the whole row orders them. The
    K candidates suffice for a row when the tokens strictly above the K-th probability already
    hold ``top_p`` of the mass: then the top-p set lies among them (tokens tied with the K-th
    may be any of the tied ones, so they must not be needed).
    """
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    vals, idx = probs.topk(k, dim=-1, sorted=True)  # (B, K)
    by_id = idx.argsort(dim=-1)  # (B, K)
    vals, idx = vals.gather(-1, by_id), idx.gather(-1, by_id)
    vals, by_prob = vals.sort(dim=-1, descending=True, stable=True)  # (B, K)
    idx = idx.gather(-1, by_prob)
    above = vals > vals[:, -1:]  # (B, K)
    ok = ((vals * above).cumsum(dim=-1)[:, -1] >= top_p) | (k == probs.shape[-1])  # (B,)
    return vals, idx, ok


def _cut_top_p(sorted_probs: Float[Tensor, "batch n"], top_p: float) -> Float[Tensor, "batch n"]:
    """Zero every token whose preceding mass (in sorted order) already reaches top_p."""
    return sorted_probs * ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p)


def _inverse_cdf(probs: Float[Tensor, "batch n"], uniforms: Float[Tensor, " batch"]
                 ) -> Int[Tensor, " batch"]:
    """Index where the cumulative mass first exceeds ``u · mass``; never a zero-mass tail."""
    cum = probs.cumsum(dim=-1)  # (B, n)
    target = uniforms.to(cum)[:, None] * cum[:, -1:]  # (B, 1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cum, target, right=True), last).squeeze(-1)


# ---- the generation loop ---------------------------------------------------------------------

def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """EOS ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    gen_cfg = getattr(loaded.model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def decode(tokenizer, ids: list[int]) -> str:
    """Exact decoding (special tokens kept, no clean-up of spaces)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_at_stop(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[list[int], str] | None:
    """If the decoded ids contain a stop string: the longest id prefix whose text ends before it."""
    text = decode(tokenizer, ids)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return None
    head = text[:min(hits)]
    k = len(ids) - 1
    while k > 0 and not head.startswith(decode(tokenizer, ids[:k])):
        k -= 1
    return ids[:k], decode(tokenizer, ids[:k])


def _finish(tokenizer, ids: list[int], eos: set[int], cfg: Sampling) -> Generation | None:
    if ids[-1] in eos:
        return Generation(ids, decode(tokenizer, ids[:-1]), "eos")
    if cfg.stop and (cut := cut_at_stop(tokenizer, ids, cfg.stop)) is not None:
        return Generation(cut[0], cut[1], "stop")
    if len(ids) >= cfg.max_new_tokens:
        return Generation(ids, decode(tokenizer, ids), "length")
    return None


@torch.no_grad()
def generate(loaded: LoadedModel, prompts: list[list[int]], seeds: list[int],
             cfg: Sampling, steering: RowSteering | None = None) -> list[Generation]:
    """Sample one completion per prompt id list with a KV cache; row b draws from seeds[b].

    ``steering``: one vector per prompt, added to its layer's output at every position of row b
    (None: unsteered). Hooks registered on the model stay active throughout.
    """
    if not prompts:
        return []
    if steering is not None and steering.vectors.shape[0] != len(prompts):
        raise LatentAuditError(
            f"steering holds {steering.vectors.shape[0]} row(s) but the batch has "
            f"{len(prompts)} prompt(s); give one vector per batch row.")

    def run(rows: list[int]) -> list[Generation]:
        part = None
        if steering is not None:  # a copy per call: selected rows stay ours
            vectors = steering.vectors[torch.as_tensor(rows, device=steering.vectors.device)]
            part = RowSteering(steering.layer,
                               vectors.to(layer_device(loaded.model, steering.layer)),
                               steering.point)
        with steer_resid(loaded.model, part):
            return _generate(loaded, [prompts[r] for r in rows], [seeds[r] for r in rows], cfg,
                             part)

    parts = guard_for(loaded.model, "generate").run(list(range(len(prompts))), run)
    return [g for part in parts for g in part]


def row_uniforms(seeds: list[int], steps: int) -> Float[Tensor, "batch steps"]:
    """Row b's first ``steps`` draws of U[0, 1) (float64) from a CPU generator seeded with
    seeds[b]: the same numbers as ``steps`` single draws."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s),
                                   dtype=torch.float64) for s in seeds])


def _generate(loaded: LoadedModel, prompts: list[list[int]], seeds: list[int],
              cfg: Sampling, steering: RowSteering | None) -> list[Generation]:
    model, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    pad = pad_id(tok)
    eos = eos_token_ids(loaded)
    B, padded = len(prompts), left_pad(prompts, pad)
    ids, mask, pos = (t.to(dev) for t in (padded.input_ids, padded.attention_mask,
                                          padded.position_ids))  # (B, T)
    uniforms = row_uniforms(seeds, cfg.max_new_tokens).to(dev)  # (B, max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    done: list[Generation | None] = [None] * B
    rows, past, extra = list(range(B)), None, last_logits_only(model)  # rows: prompt of cache row
    cache_arg = cache_argument(model)
    uniq, inverse = distinct_rows(prompts, steering)
    for step in range(cfg.max_new_tokens):
        shared = None
        if past is None and len(uniq) < B:  # samples of one prompt and condition share a prefill
            shared = _shared_prefill(model, ids, mask, pos, steering, uniq, inverse, cache_arg,
                                     extra, dev)
        if shared is not None:
            past, logits = shared
        else:
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                        use_cache=True, **{cache_arg: past}, **extra)
            past, logits = returned_cache(res, cache_arg), res.logits[:, -1]
        logits = logits.float()  # (A, V), sampled on the model's device
        u = uniforms[:, step]  # (A,) a finished row still cached draws a number it ignores
        nxt = sample_tokens(logits, u, cfg.temperature, cfg.top_p)  # (A,) on the device
        nxt = torch.where(torch.isfinite(logits).all(dim=-1), nxt, -1)  # -1: NaN or inf
        for r, token in zip(rows, nxt.tolist(), strict=True):  # the step's one wait
            if done[r] is None:
                if token < 0:
                    raise LatentAuditError(
                        f"generation: the model's logits are not finite at step {step + 1} of "
                        f"batch row {r + 1} of {B}; its text would be noise. "
                        f"{not_finite_why(model)}")
                out[r].append(token)
                done[r] = _finish(tok, out[r], eos, cfg)
        keep = [j for j, r in enumerate(rows) if done[r] is None]
        if not keep:
            break
        if len(keep) < len(rows) and hasattr(past, "batch_select_indices"):
            sel = torch.tensor(keep, device=dev)
            past.batch_select_indices(sel)
            if steering is not None:
                steering.select(sel)
            rows, mask, pos, nxt = [rows[j] for j in keep], mask[sel], pos[sel], nxt[sel]
            uniforms = uniforms[sel]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (A, T + 1)
        pos = pos[:, -1:] + 1  # (A, 1)
        ids = nxt[:, None]  # (A, 1); rows already finished but still cached are ignored
    return list(done)


def distinct_rows(prompts: list[list[int]], steering: RowSteering | None
                  ) -> tuple[list[int], list[int]]:
    """Rows with a distinct (prompt, steering vector), and each row's index among them."""
    vectors = steering.vectors.cpu() if steering is not None else None
    first: dict[tuple, int] = {}
    inverse = []
    for b, ids in enumerate(prompts):
        key = (tuple(ids), None if vectors is None else vectors[b].numpy().tobytes())
        inverse.append(first.setdefault(key, len(first)))
    uniq = [0] * len(first)
    for b, i in reversed(list(enumerate(inverse))):
        uniq[i] = b
    return uniq, inverse


def _shared_prefill(model, ids, mask, pos, steering: RowSteering | None, uniq: list[int],
                    inverse: list[int], cache_arg: str, extra: dict, dev):
    """Prefill the distinct rows only, then copy their cache and logits to every row."""
    full = steering.vectors if steering is not None else None
    if steering is not None:
        steering.vectors = full[torch.as_tensor(uniq, device=full.device)]
    try:
        res = model(input_ids=ids[uniq], attention_mask=mask[uniq], position_ids=pos[uniq],
                    use_cache=True, **{cache_arg: None}, **extra)
    finally:
        if steering is not None:
            steering.vectors = full
    past = returned_cache(res, cache_arg)
    if not hasattr(past, "batch_select_indices"):
        return None  # a cache that cannot copy rows: prefill every row
    past.batch_select_indices(torch.as_tensor(inverse, device=dev))
    return past, res.logits[torch.as_tensor(inverse, device=res.logits.device), -1]


def cache_argument(model) -> str:
    """The forward argument (and output field) of the KV cache: ``cache`` in recent
    transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output, cache_arg: str):
    """The KV cache a forward returned, under the name it was passed as (else the old name)."""
    cache = getattr(output, cache_arg, None)
    return cache if cache is not None else output.past_key_values


def last_logits_only(model) -> dict[str, int]:
    """Ask for the last position's logits only, where the model supports it."""
    return keep_logits(model, 1)
