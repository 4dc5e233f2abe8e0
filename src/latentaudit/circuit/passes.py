"""One hop of a circuit: the batch loop from the layer of the targets down to the upstream layer.

1. Per batch, one forward of the model (recording a¹ at the upstream SAE's hook point of the
   upstream layer as a leaf, a² at the target SAE's hook point of the target layer, and the
   calls of the layers between) and one backward of Σ_C ℓ_C to a² and a¹ (g², g¹), as the
   attribution stage does. Any hook point of a lower layer lies upstream of any of a higher
   one, so the products below are the same whatever the two points are.
2. The cotangent of each target at a²: ∂y_i/∂a²_t (:mod:`.math`), then its vector-Jacobian
   product down to a¹, u^(i)_t = ∂y_i/∂a¹_t. Stacked route (``route = stacked``, and ``auto`` off
   the CPU): the layers between are replayed on ``target_batch`` copies of the batch stacked in
   the batch dimension and one backward takes all their products; the replay must reproduce the
   clean a² (else, and with ``route = one-at-a-time``, ``auto`` on the CPU, or when either point
   is not resid_post, which a replay of whole layers does not pass through, one backward per
   target through the clean pass).
3. Accumulate per target M^(i)_raw = Σ_C w_C Σ_t u^(i)_t a¹_tᵀ and s^(i) = Σ_C w_C Σ_t u^(i)_t,
   and for the upstream latents' own Δ-attribution Σ w g¹ a¹ᵀ, Σ w g¹, plus Σ a¹ for a dataset ā.
4. Checkpoint the sums every few batches or seconds; a rerun with the same inputs resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import NamedTuple

import torch
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.attribution.accumulate import Accumulators
from latentaudit.attribution.loss import completion_losses_of
from latentaudit.attribution.math import batch_moments
from latentaudit.attribution.plan import Plan
from latentaudit.circuit.config import CircuitConfig
from latentaudit.circuit.math import edge_moments
from latentaudit.data.tokens import Batch, collate
from latentaudit.models.hooks import capture_layer_inputs, capture_resid
from latentaudit.models.upper import REPLAY_ERRORS, repeat_calls, run_layers

log = logging.getLogger(__name__)

Cotangents = Callable[[Tensor, Tensor, Batch, list[int]], Tensor]
"""(a², g², batch, targets) -> ∂y_i/∂a² of every target, (K, B, T, D)."""


class HopSums:
    """Running sums of one hop (float64 on the model's device)."""

    def __init__(self, k: int, d_model: int, d_sae: int, device) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.M_raw = torch.zeros(k, d_model, d_model, **z)
        self.u_sum = torch.zeros(k, d_model, **z)
        self.node = Accumulators(d_model, d_sae, device)  # g¹ moments, Σ a¹ and token counts

    def state(self) -> dict[str, Tensor]:
        return {"M_raw": self.M_raw, "u_sum": self.u_sum,
                **{f"node.{name}": getattr(self.node, name) for name in ("M_raw", "g_sum",
                                                                         "a_sum", "counts")}}

    def load(self, tensors: dict[str, Tensor]) -> None:
        for name, t in self.state().items():
            t.copy_(tensors[name])


class BatchProducts(NamedTuple):
    """What one batch gives a hop (step 1–2)."""

    acts: Tensor
    """a¹ (B, T, D)."""
    grads: Tensor
    """g¹ = ∂Σℓ/∂a¹ (B, T, D)."""
    cotangents: Tensor
    """u^(i) = ∂y_i/∂a¹ (K, B, T, D)."""
    stacked: bool
    """Whether the stacked route gave every product."""


def batch_products(model, batch: Batch, lower: int, upper: int, targets: list[int],
                   cotangents: Cotangents, target_batch: int, stacked: bool = True,
                   points: tuple[str, str] = ("resid_post", "resid_post")) -> BatchProducts:
    """Steps 1–2 for one batch: a¹, g¹ and every target's vector-Jacobian product at a¹
    (``points``: the hook points of ``lower`` and ``upper``)."""
    k = batch.n_completion
    between = list(range(lower + 1, upper + 1))
    with capture_resid(model, [lower, upper], grad_from=lower,
                       point={lower: points[0], upper: points[1]}) as store, \
            capture_layer_inputs(model, between) as calls:
        losses = completion_losses_of(  # (B,) without every position's logits
            model, k, batch.input_ids[:, -k:], batch.completion_mask[:, -k:],
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False)
    a1, a2 = store[lower], store[upper]
    g2, g1 = torch.autograd.grad(losses.sum(), [a2, a1], retain_graph=True)
    V = cotangents(a2.detach(), g2, batch, targets).to(a2.dtype)  # (K, B, T, D)
    products = _stacked(model, lower, upper, a1.detach(), a2.detach(), calls, V,
                        batch.attention_mask.bool(), target_batch) if stacked else None
    if products is not None:
        return BatchProducts(a1.detach(), g1, products, True)
    products = torch.stack([torch.autograd.grad(a2, a1, grad_outputs=v, retain_graph=True)[0]
                            for v in V])
    return BatchProducts(a1.detach(), g1, products, False)


def _stacked(model, lower: int, upper: int, a1: Tensor, a2: Tensor, calls, V: Tensor,
             valid: Tensor, target_batch: int) -> Tensor | None:
    """Products of every target, ``target_batch`` copies of the batch per backward; None when
    the replay of the layers between does not reproduce the clean a²."""
    B = a1.shape[0]
    tol = (1e-3 if a2.dtype in (torch.float32, torch.float64) else 2e-2) \
        * a2[valid].abs().max().item() + 1e-5
    out = []
    for s in range(0, V.shape[0], target_batch):
        v = V[s:s + target_batch]  # (n, B, T, D)
        n = v.shape[0]
        x = a1.repeat(n, 1, 1).requires_grad_(True)  # (n·B, T, D)
        try:
            with torch.enable_grad():
                y = run_layers(model, lower, upper, x, repeat_calls(calls, B, n))
        except REPLAY_ERRORS as err:  # the layers do not replay here: one target at a time
            log.info("replaying layers %d-%d failed (%s: %s)", lower + 1, upper,
                     type(err).__name__, err)
            return None
        if y.shape != x.shape or \
                (y.detach().view(n, *a2.shape) - a2)[:, valid].abs().max().item() > tol:
            return None
        (u,) = torch.autograd.grad(y, x, grad_outputs=v.reshape(x.shape))
        out.append(u.view(n, *a1.shape))
    return torch.cat(out)


def run_hop(model, plan: Plan, lower: int, upper: int, targets: list[int], d_sae: int,
            cotangents: Cotangents, cfg: CircuitConfig, positions: str, key: str,
            checkpoint: str | os.PathLike | None = None,
            points: tuple[str, str] = ("resid_post", "resid_post")) -> tuple[HopSums, str]:
    """Steps 1–4 over every batch of ``plan``; returns the sums and the route taken.
    ``points``: the hook points a¹ and a² are taken at."""
    lm, device = model.model, model.device
    sums = HopSums(len(targets), model.d_model, d_sae, device)
    start, route = _resume(checkpoint, key, sums)
    stacked = (stacked_route(cfg.route, device) and route != "one-at-a-time"
               and points == ("resid_post", "resid_post"))
    every_n, every_s = cfg.checkpoint_every_batches, cfg.checkpoint_every_seconds
    last_save = monotonic()
    with progress(total=len(plan.batches), desc=f"circuit L{lower}→L{upper}", unit="batch",
                  initial=start) as bar:
        for b in range(start, len(plan.batches)):
            idx = plan.batches[b]
            batch = collate([plan.seqs[j] for j in idx], plan.pad_id).to(device)
            w = torch.tensor([plan.weights[j] for j in idx], device=device)  # (B,)
            got = batch_products(lm, batch, lower, upper, targets, cotangents, cfg.target_batch,
                                 stacked, points)
            if stacked and not got.stacked:
                log.info("the layers between %d and %d do not replay here: one backward per "
                         "target from now on", lower, upper)
                stacked = False
            add_batch(sums, got, w, batch, positions)
            bar.update(1)
            if checkpoint and ((every_n and (b + 1) % every_n == 0)
                               or (every_s and monotonic() - last_save >= every_s)):
                _save(checkpoint, key, b + 1, sums, stacked)
                last_save = monotonic()
    if checkpoint:
        _save(checkpoint, key, len(plan.batches), sums, stacked)
    return sums, "stacked" if stacked else "one-at-a-time"


def stacked_route(route: str, device) -> bool:
    """Whether ``route`` (see :class:`~latentaudit.circuit.config.CircuitConfig`) stacks targets
    on ``device``."""
    return route == "stacked" or (route == "auto" and torch.device(device).type != "cpu")


def add_batch(sums: HopSums, got: BatchProducts, w: Tensor, batch: Batch, positions: str) -> None:
    """Step 3 for one batch."""
    mask = batch.attention_mask.bool() if positions == "all" else batch.completion_mask
    m = edge_moments(got.cotangents, got.acts, w, mask)
    sums.M_raw += m.M_raw.double()
    sums.u_sum += m.u_sum.double()
    node = batch_moments(got.grads, got.acts, w, mask)
    sums.node.M_raw += node.M_raw.double()
    sums.node.g_sum += node.g_sum.double()
    valid = batch.attention_mask.bool()  # (B, T)
    sums.node.a_sum += got.acts[valid].double().sum(0)
    sums.node.counts[0] += valid.sum().double()


def hop_key(model_name: str, saes: str, lower: int, upper: int, targets: list[int],
            plan: Plan, cfg: CircuitConfig, positions: str,
            points: tuple[str, str] = ("resid_post", "resid_post")) -> str:
    """What a checkpoint must match to be resumed (``saes``: fingerprints of the upstream and
    the target SAE; ``points``: their hook points)."""
    where = {} if points == ("resid_post", "resid_post") else {"points": list(points)}
    blob = json.dumps({"model": model_name, "saes": saes, "layers": [lower, upper], **where,
                       "targets": targets, "measure": cfg.measure, "positions": positions,
                       "batch_size": cfg.batch_size, "n": len(plan.used),
                       "weights": plan.weights,
                       "seq": hashlib.sha256(repr(plan.seqs).encode()).hexdigest()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(path, key: str, done: int, sums: HopSums, stacked: bool) -> None:
    from latentaudit._io import save_safetensors

    save_safetensors(path, sums.state(), metadata={
        "key": key, "batches_done": str(done),
        "route": "stacked" if stacked else "one-at-a-time"})


def _resume(path, key: str, sums: HopSums) -> tuple[int, str | None]:
    """Load a matching checkpoint into ``sums``; return the batches already done and the route
    they took."""
    if not path or not Path(path).exists():
        return 0, None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            log.info("ignoring checkpoint %s: it belongs to a different circuit", path)
            return 0, None
        tensors = {k: f.get_tensor(k).to(sums.M_raw.device) for k in f.keys()}  # noqa: SIM118
    sums.load(tensors)
    done = int(meta["batches_done"])
    log.info("resuming the circuit pass from %s: %d batches already done", path, done)
    return done, meta.get("route")
