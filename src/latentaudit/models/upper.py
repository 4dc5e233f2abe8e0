"""Run only the part of a model above a hook point: the layers above L, the final norm, the head.

1. A clean forward records the (args, kwargs) every layer above L is called with
   (:func:`~latentaudit.models.hooks.capture_layer_inputs`): attention mask, rotary position
   embeddings and position ids exactly as the model prepared them, for any architecture.
2. :func:`upper_logits` replays those calls on a new resid_post of layer L (several variants in
   the batch dimension: the recorded tensors have batch 1 and broadcast), then applies the final
   norm (:func:`final_norm`) and the output embedding at the last ``keep`` positions.
3. Architectures that change the logits after the head (soft-capping, a logit scale) would make
   the replay wrong, so a caller checks it once against the clean logits
   (:func:`replay_matches`) and otherwise falls back to full forwards with a hook at layer L.
4. :func:`run_layers` replays only the layers between two hook points, on K copies of a batch
   stacked in the batch dimension (:func:`repeat_calls` repeats the recorded per-row tensors),
   e.g. to take K vector-Jacobian products in one backward pass.
"""

from __future__ import annotations

import logging

import torch
from jaxtyping import Float
from torch import Tensor, nn

from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import layer_list

log = logging.getLogger(__name__)

REPLAY_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError)
"""What calling decoder layers directly raises in an architecture whose layers do not replay
(arguments it does not take, caches or rotary tables sized for another batch); anything else
is a bug and propagates."""
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
"""Attribute names of the final norm on the module that holds the decoder-layer list."""


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (a sibling of the decoder-layer list)."""
    layers = layer_list(model)
    name = next(n for n, m in model.named_modules() if m is layers)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    for attr in FINAL_NORM_NAMES:
        module = getattr(parent, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise LatentAuditError(
        f"Found no final norm ({', '.join(FINAL_NORM_NAMES)}) next to the decoder layers of "
        f"{type(model).__name__}: drop --through-final-norm, or add the norm's attribute name to "
        "latentaudit.models.upper.FINAL_NORM_NAMES.")


def _replay(layer: nn.Module, hidden: Tensor, call: tuple[tuple, dict]) -> Tensor:
    args, kwargs = call
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def upper_normed(model: nn.Module, layer: int, hidden: Float[Tensor, "batch pos d_model"],
                 calls: dict[int, tuple[tuple, dict]], keep: int
                 ) -> Float[Tensor, "batch keep d_model"]:
    """The final norm's output at the last ``keep`` positions when resid_post of ``layer`` is
    ``hidden``: what the output head reads. ``calls`` are the recorded calls of every layer
    above ``layer`` (step 1)."""
    layers = layer_list(model)
    for j in range(layer + 1, len(layers)):
        hidden = _replay(layers[j], hidden, calls[j])  # (B, T, D)
    return final_norm(model)(hidden[:, -keep:])  # (B, keep, D)


def upper_logits(model: nn.Module, layer: int, hidden: Float[Tensor, "batch pos d_model"],
                 calls: dict[int, tuple[tuple, dict]], keep: int
                 ) -> Float[Tensor, "batch keep vocab"]:
    """Logits at the last ``keep`` positions when resid_post of ``layer`` is ``hidden``."""
    return model.get_output_embeddings()(upper_normed(model, layer, hidden, calls, keep))


def replay_matches(model: nn.Module, layer: int, clean_hidden: Float[Tensor, "1 pos d_model"],
                   calls: dict[int, tuple[tuple, dict]],
                   clean_logits: Float[Tensor, "1 keep vocab"]) -> bool:
    """Whether replaying two copies of the clean resid_post reproduces the clean logits."""
    try:
        with torch.no_grad():
            got = upper_logits(model, layer, clean_hidden.expand(2, -1, -1), calls,
                               clean_logits.shape[1])
    except REPLAY_ERRORS as err:  # the layers do not replay here: use full forwards
        log.info("replaying the layers above %d failed (%s: %s)", layer, type(err).__name__, err)
        return False
    if tuple(got.shape) != (2, *clean_logits.shape[1:]):
        return False
    ref = clean_logits.float().expand_as(got)
    tol = 1e-3 * ref.abs().max().item() + 1e-5
    return bool((got.float() - ref).abs().max() <= tol)


def repeat_calls(calls: dict[int, tuple[tuple, dict]], rows: int, copies: int
                 ) -> dict[int, tuple[tuple, dict]]:
    """Recorded calls for ``copies`` copies of a batch of ``rows`` rows, stacked copy-major: every
    tensor of two or more dimensions whose first dimension is ``rows`` is repeated (masks,
    position ids, rotary embeddings); everything else is kept as it is."""

    def rep(x):
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == rows:
            return x.repeat(copies, *([1] * (x.dim() - 1)))
        if isinstance(x, tuple):
            return tuple(rep(v) for v in x)
        if isinstance(x, list):
            return [rep(v) for v in x]
        return x

    return {j: (rep(args), {k: rep(v) for k, v in kwargs.items()})
            for j, (args, kwargs) in calls.items()}


def run_layers(model: nn.Module, lower: int, upper: int,
               hidden: Float[Tensor, "batch pos d_model"],
               calls: dict[int, tuple[tuple, dict]]) -> Float[Tensor, "batch pos d_model"]:
    """resid_post of layer ``upper`` when resid_post of layer ``lower`` is ``hidden``: the
    recorded calls (step 1) of layers lower + 1 … upper replayed, nothing above them."""
    layers = layer_list(model)
    for j in range(lower + 1, upper + 1):
        hidden = _replay(layers[j], hidden, calls[j])  # (B, T, D)
    return hidden
