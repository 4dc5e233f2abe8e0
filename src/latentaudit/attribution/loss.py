"""The completion tokens' loss without full-vocabulary logits at every position.

A forward + backward over k completion tokens of B rows would hold B·k·V logits, their
log-softmax and their gradient (three float32 tensors of B·k·V: 1.5 GB at B = 8, k = 64 and
Qwen's 152k vocabulary), more than the model's own activations. Instead:

1. The forward runs with the logits of the last position only and a hook on the final norm
   (:func:`~latentaudit.models.upper.final_norm`) keeps its output h (B, T, D).
2. ℓ_t = logsumexp(W h_t + b) − (W h_t + b)_{y_t} in row chunks of about 64 MB of logits
   (:func:`head_cross_entropy`); its backward recomputes each chunk's logits and gives
   ∂ℓ/∂h_t = Σ_t' grad_t (softmax(z_t) − e_{y_t}) W, so no chunk outlives its step.
3. The row loss is the mean over the row's completion tokens, as
   :func:`~latentaudit.attribution.math.completion_losses` computes it from logits.
4. Models whose logits are not ``head(final_norm(h))`` (soft-capping, a logit scale) would get a
   wrong loss: once per model the head applied to the hooked last position is compared with
   the model's own last logits (:func:`head_route_holds`); where it differs, and for models
   without a final norm, the loss comes from the model's logits of the k + 1 last positions
   instead (the previous route, same result, more memory).
"""

from __future__ import annotations

import logging
import weakref

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from latentaudit.attribution.math import completion_losses
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import keep_logits

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 26
"""Bytes of float32 logits per chunk of rows."""

_ROUTE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    z = h @ weight.T  # (n, V) in the model's dtype, as its head computes it
    z = z if bias is None else z + bias
    return z if z.dtype == torch.float64 else z.float()


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows):
        wide = torch.float64 if h.dtype == torch.float64 else torch.float32
        out = torch.empty(h.shape[0], dtype=wide, device=h.device)
        for s in range(0, h.shape[0], rows):
            z = _logits(h[s:s + rows], weight, bias)  # (n, V)
            out[s:s + rows] = torch.logsumexp(z, -1) - z.gather(1, targets[s:s + rows, None])[:, 0]
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, targets = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        for s in range(0, h.shape[0], ctx.rows):
            p = torch.softmax(_logits(h[s:s + ctx.rows], weight, bias), -1)  # (n, V)
            p.scatter_add_(1, targets[s:s + ctx.rows, None],
                           -torch.ones_like(p[:, :1]))
            grad_h[s:s + ctx.rows] = (p * grad[s:s + ctx.rows, None]).to(h.dtype) @ weight
        return grad_h, None, None, None, None


def head_cross_entropy(h: Float[Tensor, "n d_model"], weight: Float[Tensor, "vocab d_model"],
                       bias: Float[Tensor, " vocab"] | None, targets: Int[Tensor, " n"]
                       ) -> Float[Tensor, " n"]:
    """Cross-entropy of ``targets`` under logits ``h Wᵀ + b`` (float32 at least), never holding
    more than :data:`CHUNK_BYTES` of logits (step 2); differentiable in ``h``."""
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    if bias is not None and bias.requires_grad or weight.requires_grad:
        raise LatentAuditError("head_cross_entropy needs a frozen output head.")
    return _HeadCrossEntropy.apply(h, weight, bias, targets.long(), rows)


def masked_mean(ce: Float[Tensor, "batch k"], mask: Bool[Tensor, "batch k"]
                ) -> Float[Tensor, " batch"]:
    """Mean of ``ce`` over each row's ``mask`` (step 3)."""
    ce = ce * mask
    return ce.sum(1) / mask.sum(1).clamp_min(1)


def frozen_head(model: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of the model's output head when it is a frozen linear layer, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.weight.requires_grad or (
            head.bias is not None and head.bias.requires_grad):
        return None  # a head being trained keeps autograd's own route
    return head.weight, head.bias


def head_route_holds(model: nn.Module, hidden_last: Tensor, logits_last: Tensor) -> bool:
    """Whether head(final-norm output) reproduces the model's logits (step 4), cached."""
    if model not in _ROUTE:
        w_b = frozen_head(model)
        ok = False
        if w_b is not None:
            with torch.no_grad():
                got = _logits(hidden_last, *w_b)
            ref = logits_last.float()
            ok = bool((got - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-5)
        if not ok:
            log.info("the model's logits are not its head applied to the final norm: the "
                     "completion loss uses full logits")
        _ROUTE[model] = ok
    return _ROUTE[model]


def completion_losses_of(model: nn.Module, k: int, targets: Int[Tensor, "batch k"],
                         mask: Bool[Tensor, "batch k"], **inputs) -> Float[Tensor, " batch"]:
    """ℓ of every row: the mean cross-entropy of its last k tokens (where ``mask``), given the
    forward's ``inputs`` (steps 1–4); differentiable through the model."""
    from latentaudit.models.upper import final_norm

    try:
        norm = final_norm(model) if _ROUTE.get(model, True) and frozen_head(model) else None
    except LatentAuditError:
        norm = None
    if norm is None:
        _ROUTE[model] = False
        logits = model(**inputs, **keep_logits(model, k + 1)).logits[:, -(k + 1):-1]
        return completion_losses(logits, targets, mask)
    store: list[Tensor] = []
    handle = norm.register_forward_hook(lambda m, a, out: store.append(out))
    try:
        last = model(**inputs, **keep_logits(model, 1)).logits[:, -1]  # (B, V)
    finally:
        handle.remove()
    h = store[-1]  # (B, T, D)
    if not head_route_holds(model, h[:, -1].detach(), last.detach()):
        logits = model(**inputs, **keep_logits(model, k + 1)).logits[:, -(k + 1):-1]
        return completion_losses(logits, targets, mask)
    weight, bias = frozen_head(model)
    hk = h[:, -(k + 1):-1]  # (B, k, D) predicts the k completion tokens
    ce = head_cross_entropy(hk.reshape(-1, hk.shape[-1]), weight, bias, targets.reshape(-1))
    return masked_mean(ce.view(targets.shape), mask)


def upper_completion_losses(model: nn.Module, layer: int, hidden: Float[Tensor, "n pos d_model"],
                            calls: dict[int, tuple[tuple, dict]], targets: Int[Tensor, " k"]
                            ) -> Float[Tensor, " n"]:
    """The mean loss of the last k tokens (``targets``) of each row when resid_post of ``layer``
    is ``hidden``: :func:`~latentaudit.models.upper.upper_logits` with the head's cross-entropy
    taken in chunks (step 2), so no (n, k, V) logits are held. Needs :func:`frozen_head`."""
    from latentaudit.models.upper import final_norm, run_layers

    k, n = targets.shape[0], hidden.shape[0]
    w_b = frozen_head(model)
    if w_b is None:
        raise LatentAuditError("upper_completion_losses needs a frozen linear output head "
                               "(see frozen_head).")
    x = run_layers(model, layer, max(calls, default=layer), hidden, calls)  # (n, T, D)
    h = final_norm(model)(x[:, -(k + 1):-1])  # (n, k, D)
    ce = head_cross_entropy(h.reshape(n * k, -1), *w_b, targets.repeat(n))
    return ce.view(n, k).mean(1)
