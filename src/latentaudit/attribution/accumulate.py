"""The batch loop: forward + backward per batch, moments accumulated (steps 3–4 of the package
docstring).

1. Left-pad a batch of the plan, run one forward (logits only where the completion is predicted)
   and one backward of the summed completion losses to the hooked activations.
2. Add the batch's weighted moments Σ w g aᵀ and Σ w g, the activation sum (for a dataset ā)
   and, for Δ-activation, the SAE latent sums over positive and negative completion tokens.
3. Every ``checkpoint_every_batches`` batches or ``checkpoint_every_seconds`` seconds, save the
   sums with the number of batches done; a rerun with the same inputs resumes after them.

Accumulators are plain sums, so the order of batches does not change the result.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from time import monotonic
from typing import NamedTuple

import torch
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.attribution.config import AttributionConfig
from latentaudit.attribution.math import batch_moments, completion_losses
from latentaudit.attribution.plan import Plan
from latentaudit.data.tokens import Batch, collate
from latentaudit.models.hooks import capture_resid
from latentaudit.models.load import LoadedModel
from latentaudit.saes.sae import SAE

log = logging.getLogger(__name__)

FINISH_ONLY = ("abar", "top_k", "checkpoint_every_batches", "checkpoint_every_seconds")
"""Options that do not change the sums, so changing them keeps a checkpoint valid."""


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


class Sums(NamedTuple):
    """What the loop leaves for the finish step."""

    acc: dict[int, Accumulators]
    """Accumulators per layer."""
    losses: Tensor
    """ℓ_C of each used completion (float64, in plan order)."""


def run_batches(model: LoadedModel, saes: dict[int, SAE], plan: Plan, cfg: AttributionConfig,
                checkpoint: str | os.PathLike | None = None) -> Sums:
    """Run every batch of ``plan`` not already in ``checkpoint`` and return the sums."""
    lm, device, layers = model.model, model.device, list(saes)
    acc = {L: Accumulators(model.d_model, sae.d_sae, device) for L, sae in saes.items()}
    losses = torch.zeros(len(plan.used), dtype=torch.float64)
    keep_arg = "logits_to_keep" in inspect.signature(lm.forward).parameters
    key = run_key(model, saes, plan, cfg)
    start = _resume(checkpoint, key, acc, losses)
    every_n, every_s = cfg.checkpoint_every_batches, cfg.checkpoint_every_seconds
    last_save = monotonic()
    with progress(total=len(plan.batches), desc="attribute", unit="batch", initial=start) as bar:
        for b in range(start, len(plan.batches)):
            idx = plan.batches[b]
            batch = collate([plan.seqs[j] for j in idx], plan.pad_id).to(device)
            w = torch.tensor([plan.weights[j] for j in idx], device=device)  # (B,)
            positive = torch.tensor([plan.positive[j] for j in idx], device=device)  # (B,)
            batch_losses, per_layer = forward_backward(lm, batch, layers, keep_arg)
            losses[idx] = batch_losses.double().cpu()
            mask = batch.attention_mask.bool() if cfg.positions == "all" else batch.completion_mask
            for L, (a, g) in per_layer.items():
                _accumulate(acc[L], saes[L] if cfg.delta_activation else None, a, g, w, mask,
                            batch, positive)
            bar.update(1)
            if checkpoint and ((every_n and (b + 1) % every_n == 0)
                               or (every_s and monotonic() - last_save >= every_s)):
                _save_checkpoint(checkpoint, key, b + 1, acc, losses)
                last_save = monotonic()
    if checkpoint and (every_n or every_s):
        _save_checkpoint(checkpoint, key, len(plan.batches), acc, losses)
    return Sums(acc, losses)


def run_key(model: LoadedModel, saes: dict[int, SAE], plan: Plan, cfg: AttributionConfig) -> str:
    """What a checkpoint must match to be resumed: model, SAEs, sequences and options."""
    options = {k: v for k, v in asdict(cfg).items() if k not in FINISH_ONLY}
    blob = json.dumps({**options, "layers": list(saes), "n": len(plan.used), "model": model.name,
                       "seq": hashlib.sha256(repr(plan.seqs).encode()).hexdigest(),
                       "saes": [s.info.source_path for s in saes.values()]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _latent_sums(sae: SAE, acts: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
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


def forward_backward(model, batch: Batch, layers: list[int], keep_arg: bool | None = None
                     ) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """One forward (logits only where needed) and one backward to the hooked activations.

    Returns ℓ_C of each row and {layer: (a, g)} with a and g = ∂Σℓ/∂a of shape (B, T, D).
    ``keep_arg``: whether the model's forward takes ``logits_to_keep`` (None: look it up). The
    explain stage reuses this for its per-token attribution maps.
    """
    if keep_arg is None:
        keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
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


def _accumulate(acc: Accumulators, sae: SAE | None, a: Tensor, g: Tensor, w: Tensor,
                mask: Tensor, batch: Batch, positive: Tensor) -> None:
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


def _save_checkpoint(path, key: str, done: int, acc: dict[int, Accumulators],
                     losses: Tensor) -> None:
    from latentaudit._io import save_safetensors

    tensors = {"losses": losses}
    for L, a in acc.items():
        tensors.update(a.state(L))
    save_safetensors(path, tensors, metadata={"key": key, "batches_done": str(done)})


def _resume(path, key: str, acc: dict[int, Accumulators], losses: Tensor) -> int:
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
