"""The batch loop: forward + backward per batch, moments accumulated (steps 3–4 of the package
docstring).

1. Left-pad a batch of the plan, run one forward (logits only where the completion is predicted)
   and one backward of the summed completion losses to the hooked activations.
2. Compute the batch's weighted moments Σ w g aᵀ and Σ w g, the activation sum (for a dataset ā)
   and, for Δ-activation, the SAE latent sums over positive and negative completion tokens
   (streamed a latent chunk at a time when the SAE is not on the device,
   :mod:`latentaudit.saes.stream`), then add them to the running sums. A batch that runs out of
   device memory is split and retried (:class:`~latentaudit.batching.BatchGuard`): its sums are
   added only once it succeeds, so nothing is lost or counted twice.
3. Every ``checkpoint_every_batches`` batches or ``checkpoint_every_seconds`` seconds, save the
   sums with the number of batches done; a rerun with the same inputs resumes after them.
   The losses come to the host first and must be finite: a NaN loss would make every Δ NaN,
   so it stops the run, with the completion it came from, before any checkpoint holds it.

Accumulators are plain sums, so the order of batches does not change the result. The loop does
not wait for the device: masks select by weight 0, token indices are computed on the host, and
losses are copied back only at checkpoints and at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from latentaudit.attribution.loss import completion_losses_of
from latentaudit.attribution.math import _wide, batch_moments
from latentaudit.attribution.plan import Plan
from latentaudit.batching import guard_for
from latentaudit.data.tokens import Batch, collate
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import not_finite_why
from latentaudit.models.hooks import capture_resid, layer_device
from latentaudit.models.load import LoadedModel
from latentaudit.saes.sae import SAE
from latentaudit.saes.stream import encode_chunks

log = logging.getLogger(__name__)

FINISH_ONLY = ("abar", "top_k", "checkpoint_every_batches", "checkpoint_every_seconds",
               "sae_chunk")
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

    def add(self, sums: dict[str, Tensor | None]) -> None:
        """Add one batch's sums (:func:`layer_sums`); absent Δ-activation sums add nothing."""
        for name in self.NAMES:
            if sums.get(name) is not None:
                getattr(self, name).add_(sums[name].to(self.M_raw.device))


class Sums(NamedTuple):
    """What the loop leaves for the finish step."""

    acc: dict[int, Accumulators]
    """Accumulators per layer."""
    losses: Tensor
    """ℓ_C of each used completion (float64, in plan order)."""


class BatchSums(NamedTuple):
    """What one batch (or slice of one) adds: its rows' losses and each layer's sums."""

    rows: list[int]
    """Positions into the plan's ``used`` completions."""
    losses: Tensor
    """ℓ_C of those rows, on the device."""
    layers: dict[int, dict[str, Tensor | None]]
    """{layer: sums named as :attr:`Accumulators.NAMES`}."""


def run_batches(model: LoadedModel, saes: dict[int, SAE], plan: Plan, cfg: AttributionConfig,
                checkpoint: str | os.PathLike | None = None,
                chunks: dict[int, int] | None = None) -> Sums:
    """Run every batch of ``plan`` not already in ``checkpoint`` and return the sums.

    ``chunks``: latents per streamed chunk of each layer's SAE (default: all at once).
    """
    lm = model.model
    acc = {L: Accumulators(model.d_model, sae.d_sae, layer_device(lm, L))
           for L, sae in saes.items()}
    losses = torch.zeros(len(plan.used), dtype=torch.float64)
    key = run_key(model, saes, plan, cfg)
    start = _resume(checkpoint, key, acc, losses)
    every_n, every_s = cfg.checkpoint_every_batches, cfg.checkpoint_every_seconds
    last_save = monotonic()
    guard = guard_for(lm, "attribute")
    pending: list[BatchSums] = []  # losses still on the device

    def slice_sums(rows: list[int]) -> BatchSums:
        return batch_sums(model, saes, plan, rows, cfg, chunks=chunks)

    def flush() -> None:
        _flush_losses(pending, losses)
        check_finite(losses, plan, model)

    with progress(total=len(plan.batches), desc="attribute", unit="batch", initial=start) as bar:
        for b in range(start, len(plan.batches)):
            for part in guard.run(plan.batches[b], slice_sums):
                for L, sums in part.layers.items():
                    acc[L].add(sums)
                pending.append(part._replace(layers={}))
            bar.update(1)
            if checkpoint and ((every_n and (b + 1) % every_n == 0)
                               or (every_s and monotonic() - last_save >= every_s)):
                flush()
                _save_checkpoint(checkpoint, key, b + 1, acc, losses)
                last_save = monotonic()
    flush()
    if checkpoint and (every_n or every_s):
        _save_checkpoint(checkpoint, key, len(plan.batches), acc, losses)
    return Sums(acc, losses)


def _flush_losses(pending: list[BatchSums], losses: Tensor) -> None:
    """Copy the losses of finished batches to the host (one wait for the device)."""
    for part in pending:
        losses[part.rows] = part.losses.double().cpu()
    pending.clear()


def check_finite(losses: Tensor, plan: Plan, model: LoadedModel) -> None:
    """One clear error when a completion's loss is NaN or infinite (0 marks one not yet run)."""
    bad = (~torch.isfinite(losses)).nonzero().squeeze(1).tolist()
    if not bad:
        return
    raise LatentAuditError(
        f"attribution: the loss of {len(bad)} of {len(losses)} completions is not finite "
        f"(first: dataset row {plan.used[bad[0]] + 1}); every Δ would be NaN. "
        f"{not_finite_why(model.model)}")


def batch_sums(model: LoadedModel, saes: dict[int, SAE], plan: Plan, rows: list[int],
               cfg: AttributionConfig,
               chunks: dict[int, int] | None = None) -> BatchSums:
    """Steps 1–2 for the completions ``rows`` of the plan, changing nothing outside."""
    cpu_batch = collate([plan.seqs[j] for j in rows], plan.pad_id)
    comp_idx = cpu_batch.completion_mask.reshape(-1).nonzero().squeeze(1)  # (N,) host side
    batch = cpu_batch.to(model.device)
    w = torch.tensor([plan.weights[j] for j in rows])  # (B,)
    positive = torch.tensor([plan.positive[j] for j in rows])  # (B,)
    # a transcoder's encoder reads another point (the MLP's input) than attribution does
    reads = {L: s.read_point for L, s in saes.items()
             if cfg.delta_activation and s.read_point != s.info.hook}
    with (capture_resid(model.model, list(reads), point=reads) if reads
          else contextlib.nullcontext({})) as read:
        batch_losses, per_layer = forward_backward(
            model.model, batch, list(saes), points={L: s.info.hook for L, s in saes.items()})
    out = {}
    for L, (a, g) in per_layer.items():
        mask = (batch.attention_mask.bool() if cfg.positions == "all"
                else batch.completion_mask)
        sae = saes[L] if cfg.delta_activation else None
        out[L] = layer_sums(sae, a, g, w, mask, batch, positive, comp_idx,
                            (chunks or {}).get(L), read[L].detach() if L in read else None)
    return BatchSums(list(rows), batch_losses, out)


def run_key(model: LoadedModel, saes: dict[int, SAE], plan: Plan, cfg: AttributionConfig) -> str:
    """What a checkpoint must match to be resumed: model, SAEs, sequences and options."""
    options = {k: v for k, v in asdict(cfg).items() if k not in FINISH_ONLY}
    blob = json.dumps({**options, "layers": list(saes), "n": len(plan.used), "model": model.name,
                       "seq": hashlib.sha256(repr(plan.seqs).encode()).hexdigest(),
                       "saes": [s.info.source_path for s in saes.values()]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _latent_sums(sae: SAE, acts: Tensor, positive: Tensor, chunk: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Σ of SAE latent activations over positive rows and negative rows, in token chunks and
    (``chunk``) latent chunks."""
    chunk = chunk or sae.d_sae
    rows = max(1, (1 << 26) // chunk)  # ~256 MB of float32 latents per block
    pos = torch.zeros(sae.d_sae, dtype=torch.float64, device=acts.device)
    neg = torch.zeros_like(pos)
    for r in range(0, acts.shape[0], rows):
        side = positive[r:r + rows].to(acts.device, torch.float64)  # (n,)
        for s, f in encode_chunks(sae, acts[r:r + rows], chunk):
            f = f.double()  # (n, c)
            pos[s:s + f.shape[1]] += side @ f
            neg[s:s + f.shape[1]] += (1 - side) @ f
    return pos, neg


def forward_backward(model, batch: Batch, layers: list[int], points: dict[int, str] | None = None
                     ) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """One forward (logits only where needed) and one backward to the hooked activations.

    Returns ℓ_C of each row and {layer: (a, g)} with a and g = ∂Σℓ/∂a of shape (B, T, D), at
    each layer's hook point in ``points`` (default resid_post).
    The explain stage reuses this for its per-token attribution maps.
    """
    k = batch.n_completion
    with capture_resid(model, layers, grad_from=min(layers), point=points or {}) as store:
        losses = completion_losses_of(  # (B,) without every position's logits
            model, k, batch.input_ids[:, -k:], batch.completion_mask[:, -k:],
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False)
    grads = torch.autograd.grad(losses.sum(), [store[L] for L in layers])
    return losses.detach(), {L: (store[L].detach(), g) for L, g in zip(layers, grads, strict=True)}


def layer_sums(sae: SAE | None, a: Tensor, g: Tensor, w: Tensor, mask: Tensor, batch: Batch,
               positive: Tensor, comp_idx: Tensor | None = None, chunk: int | None = None,
               encoded: Tensor | None = None) -> dict[str, Tensor | None]:
    """One batch's sums at one layer, on the layer's device (named as
    :attr:`Accumulators.NAMES`; f_pos and f_neg are None without an SAE). ``encoded``: what the
    SAE's encoder reads when it is not ``a`` (a transcoder's MLP input), (B, T, D).

    ``comp_idx``: flat indices of the completion positions (computed on the host, so selecting
    them does not wait for the device; None: from ``batch``).
    """
    dev = a.device
    w, mask, positive = w.to(dev), mask.to(dev), positive.to(dev)
    m = batch_moments(g, a, w, mask)
    valid = batch.attention_mask.to(dev).bool()  # (B, T)
    comp = batch.completion_mask.to(dev)  # (B, T)
    side_bt = positive[:, None] & comp  # (B, T)
    counts = torch.stack([valid.sum(), side_bt.sum(), (comp & ~positive[:, None]).sum()])
    wide = _wide(a).reshape(-1, a.shape[-1])  # (B*T, D)
    out = {"M_raw": m.M_raw.double(), "g_sum": m.g_sum.double(),
           "a_sum": (valid.reshape(1, -1).to(wide.dtype) @ wide).squeeze(0).double(),
           "f_pos": None, "f_neg": None,
           "counts": counts.double()}
    if sae is not None:
        if comp_idx is None:
            comp_idx = batch.completion_mask.reshape(-1).nonzero().squeeze(1)
        comp_idx = comp_idx.to(dev, non_blocking=True)
        x = a if encoded is None else encoded.to(dev)
        acts = x.reshape(-1, x.shape[-1]).index_select(0, comp_idx)  # (N, D)
        side = side_bt.reshape(-1).index_select(0, comp_idx)  # (N,)
        with torch.no_grad():
            out["f_pos"], out["f_neg"] = _latent_sums(sae, acts, side, chunk)
    return out


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
