"""The attribution driver: batches completions, runs forward + backward, accumulates moments.

Accumulators are plain sums (moments, gradient sums, activation sums, latent-activation sums), so
a run can checkpoint them and resume after being killed: batches are formed deterministically
(completions sorted by length), and a checkpoint records how many batches are done.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.attribute.config import AttributionConfig, AttributionResult, LayerAttribution
from latentaudit.attribute.math import (
    batch_moments,
    center,
    completion_losses,
    deltas_from_moments,
)
from latentaudit.data.behaviour import Completion, load_behaviour, make_pairs
from latentaudit.data.tokens import Batch, collate, completion_ids, prompt_ids
from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import capture_resid

log = logging.getLogger(__name__)


def resolve_saes(saes, layers) -> dict:
    """Normalise the ``saes`` argument to {layer: SAE}."""
    if isinstance(saes, dict):
        return dict(sorted(saes.items()))
    layer = layers if isinstance(layers, int) else (layers[0] if layers else saes.info.layer)
    if layer is None:
        raise LatentAuditError(
            "The SAE does not record its layer: pass the layer (--layer L) explicitly.")
    return {int(layer): saes}


def encode_completions(tokenizer, data: list[Completion], max_len: int | None
                       ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each completion, with a clear error for overlong ones."""
    out = []
    for c in data:
        p = c.prompt_token_ids or prompt_ids(tokenizer, c.prompt, c.system)
        q = c.completion_token_ids or completion_ids(tokenizer, c.completion)
        if not q:
            raise LatentAuditError(f"{c.where}: the completion has no tokens.")
        if max_len and len(p) + len(q) > max_len:
            raise LatentAuditError(
                f"{c.where}: prompt + completion is {len(p) + len(q)} tokens, more than the "
                f"model's {max_len} positions; shorten it.")
        out.append((p, q))
    return out


class Accumulators:
    """Running sums at one layer (all float64 on the model's device)."""

    NAMES = ("M_raw", "g_sum", "a_sum", "f_pos", "f_neg", "counts")

    def __init__(self, d_model: int, d_sae: int, device) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.M_raw = torch.zeros(d_model, d_model, **z)
        self.g_sum = torch.zeros(d_model, **z)
        self.a_sum = torch.zeros(d_model, **z)  # activations summed over every non-pad token
        self.f_pos = torch.zeros(d_sae, **z)  # latent activations summed over positive tokens
        self.f_neg = torch.zeros(d_sae, **z)
        self.counts = torch.zeros(3, **z)  # tokens: all, positive completion, negative completion

    def state(self, layer: int) -> dict[str, Tensor]:
        return {f"{name}.{layer}": getattr(self, name) for name in self.NAMES}

    def load(self, layer: int, tensors: dict[str, Tensor]) -> None:
        for name in self.NAMES:
            getattr(self, name).copy_(tensors[f"{name}.{layer}"])


def _latent_sums(sae, acts: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Σ of SAE latent activations over positive rows and negative rows, in token chunks."""
    chunk = max(1, (1 << 26) // sae.d_sae)  # ~256 MB of float32 latents per chunk
    pos = torch.zeros(sae.d_sae, dtype=torch.float64, device=acts.device)
    neg = torch.zeros_like(pos)
    for s in range(0, acts.shape[0], chunk):
        f = sae.encode(acts[s:s + chunk].to(sae.W_enc.dtype)).double()  # (n, S)
        side = positive[s:s + chunk].double()  # (n,)
        pos += side @ f
        neg += (1 - side) @ f
    return pos, neg


def _forward_backward(model, batch: Batch, layers: list[int], keep_arg: bool):
    """One forward (logits only where needed) and one backward to the hooked activations."""
    k = batch.n_completion
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    if keep_arg:
        kwargs["logits_to_keep"] = k + 1
    with capture_resid(model, layers, grad_from=min(layers)) as store:
        logits = model(**kwargs).logits[:, -(k + 1):-1]  # (B, k, V)
    targets = batch.input_ids[:, -k:]  # (B, k)
    losses = completion_losses(logits, targets, batch.completion_mask[:, -k:])  # (B,)
    grads = torch.autograd.grad(losses.sum(), [store[L] for L in layers])
    return losses.detach(), {L: (store[L].detach(), g) for L, g in zip(layers, grads, strict=True)}


def _config_hash(cfg: AttributionConfig, extra: dict) -> str:
    blob = json.dumps({**asdict(cfg), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def attribute(model, saes, data, cfg: AttributionConfig | None = None, *, layers=None,
              checkpoint: str | Path | None = None) -> AttributionResult:
    """Rank SAE latents by Δ-attribution for a behaviour dataset.

    model: a :class:`~latentaudit.models.LoadedModel`. saes: an SAE or {layer: SAE}; a single SAE
    reads ``layers`` (an int) or the layer recorded in it. data: a behaviour JSONL path or a list
    of :class:`~latentaudit.data.behaviour.Completion`. checkpoint: a file for resumable
    accumulator checkpoints (a rerun with the same inputs continues from it).
    """
    cfg = cfg or AttributionConfig()
    saes = resolve_saes(saes, layers)
    lm, tok = model.model, model.tokenizer
    for layer, sae in saes.items():
        sae.check_fits(model.d_model, layer, model_name=model.name)
    data = load_behaviour(data) if isinstance(data, (str, Path)) else list(data)
    pairing = make_pairs(data, cfg.pairing)
    if not pairing.pairs:
        raise LatentAuditError(
            "No prompt has both a positive and a negative completion, so there are no pairs to "
            "attribute; add completions with the missing label.")
    used = pairing.used
    weights = pairing.weights(len(data))
    max_len = getattr(lm.config, "max_position_embeddings", None)
    seqs = encode_completions(tok, [data[i] for i in used], max_len)
    order = sorted(range(len(used)), key=lambda j: (len(seqs[j][0]) + len(seqs[j][1]), j))
    batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]

    device = model.device
    layer_list = list(saes)
    acc = {L: Accumulators(model.d_model, sae.d_sae, device) for L, sae in saes.items()}
    losses = torch.zeros(len(used), dtype=torch.float64)
    keep_arg = "logits_to_keep" in inspect.signature(lm.forward).parameters
    key = _config_hash(cfg, {"layers": layer_list, "n": len(used), "model": model.name,
                             "seq": hashlib.sha256(repr(seqs).encode()).hexdigest(),
                             "saes": [s.info.source_path for s in saes.values()]})
    start = _resume(checkpoint, key, acc, losses)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    last_save = time.monotonic()
    bar = progress(total=len(batches), desc="attribute", unit="batch")
    bar.update(start)
    for b in range(start, len(batches)):
        idx = batches[b]
        batch = collate([seqs[j] for j in idx], pad).to(device)
        w = torch.tensor([weights[used[j]] for j in idx], device=device)  # (B,)
        positive = torch.tensor([data[used[j]].positive for j in idx], device=device)  # (B,)
        batch_losses, per_layer = _forward_backward(lm, batch, layer_list, keep_arg)
        losses[idx] = batch_losses.double().cpu()
        mask = batch.attention_mask.bool() if cfg.positions == "all" else batch.completion_mask
        for L, (a, g) in per_layer.items():
            _accumulate(acc[L], saes[L] if cfg.delta_activation else None, a, g, w, mask, batch,
                        positive)
        bar.update(1)
        if checkpoint and cfg.checkpoint_every and (
                (b + 1) % cfg.checkpoint_every == 0 or time.monotonic() - last_save > 300):
            _save_checkpoint(checkpoint, key, b + 1, acc, losses)
            last_save = time.monotonic()
    bar.close()
    result = _finish(saes, acc, cfg, pairing, data, used, seqs, losses)
    if checkpoint:
        _save_checkpoint(checkpoint, key, len(batches), acc, losses)
    return result


def _accumulate(acc: Accumulators, sae, a: Tensor, g: Tensor, w: Tensor, mask: Tensor,
                batch: Batch, positive: Tensor) -> None:
    m = batch_moments(g, a, w, mask)
    acc.M_raw += m.M_raw.double()
    acc.g_sum += m.g_sum.double()
    valid = batch.attention_mask.bool()  # (B, T)
    acc.a_sum += a[valid].double().sum(0)
    comp = batch.completion_mask  # (B, T)
    side = positive[:, None].expand_as(comp)[comp]  # (N,)
    if sae is not None:
        with torch.no_grad():
            pos, neg = _latent_sums(sae, a[comp], side)
        acc.f_pos += pos
        acc.f_neg += neg
    acc.counts += torch.stack([valid.sum(), side.sum(), (~side).sum()]).double()  # no sync


def choose_abar(source: str, sae, acc: Accumulators) -> tuple[Tensor, str]:
    """ā and the name of its source."""
    if source == "auto":
        source = "sae" if sae.mean_activation is not None else "dataset"
    if source == "sae":
        if sae.mean_activation is None:
            raise LatentAuditError(
                f"--abar sae was requested but {sae.info.source_path or 'the SAE'} stores no mean "
                "activation; use --abar dataset or --abar zero.")
        return sae.mean_activation.detach().double().to(acc.M_raw.device), "sae"
    if source == "dataset":
        return acc.a_sum / acc.counts[0].clamp_min(1), "dataset"
    return torch.zeros_like(acc.g_sum), "zero"


def _finish(saes, acc, cfg, pairing, data, used, seqs, losses) -> AttributionResult:
    out = {}
    for L, sae in saes.items():
        a = acc[L]
        a_bar, source = choose_abar(cfg.abar, sae, a)
        M = center(a.M_raw, a.g_sum, a_bar)
        dirs = sae.decoder_directions().to(M.device)
        n_pos, n_neg = a.counts[1].clamp_min(1), a.counts[2].clamp_min(1)
        out[L] = LayerAttribution(
            layer=L, delta_attribution=deltas_from_moments(M, dirs).cpu(),
            delta_activation=((a.f_pos / n_pos - a.f_neg / n_neg).float().cpu()
                              if cfg.delta_activation else None),
            moment_matrix=M.float().cpu(), a_bar=a_bar.float().cpu(), abar_source=source)
    first = acc[next(iter(saes))]
    prompts = {data[i].prompt_id for p in pairing.pairs for i in p}
    return AttributionResult(
        layers=out, n_completions=len(used), n_pairs=len(pairing.pairs), n_prompts=len(prompts),
        n_tokens=int(first.counts[0].item()),
        n_completion_tokens=sum(len(q) for _, q in seqs),
        skipped_prompts=pairing.skipped_prompts, completion_losses=losses.tolist())


def _save_checkpoint(path, key: str, done: int, acc: dict, losses: Tensor) -> None:
    from latentaudit._io import save_safetensors

    tensors = {"losses": losses}
    for L, a in acc.items():
        tensors.update(a.state(L))
    save_safetensors(path, tensors, metadata={"key": key, "batches_done": str(done)})


def _resume(path, key: str, acc: dict, losses: Tensor) -> int:
    """Load a matching checkpoint into the accumulators; return the batches already done."""
    if not path or not Path(path).exists():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            log.info("ignoring checkpoint %s: it belongs to a different run", path)
            return 0
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    losses.copy_(tensors["losses"])
    for L, a in acc.items():
        a.load(L, {k: v.to(a.M_raw.device) for k, v in tensors.items()})
    done = int(meta["batches_done"])
    log.info("resuming attribution from %s: %d batches already done", path, done)
    return done
