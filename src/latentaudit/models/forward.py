"""What a model's forward takes and a tokenizer pads with, decided in one place.

1. :func:`keep_logits`: the keyword that limits a forward's logits to the last positions
   (``logits_to_keep`` in current Hugging Face models, ``num_logits_to_keep`` in older ones;
   none in models without it, which then return every position's logits), read from its
   ``forward`` signature.
2. :func:`pad_id`: the tokenizer's pad id, or 0 when it has none (padded positions are masked,
   so the id only has to be a valid one).
3. :func:`not_finite_why`: what to tell a user whose forward returned NaN or inf;
   :func:`require_finite` raises it for a stage's output.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from latentaudit.errors import LatentAuditError

KEEP_NAMES = ("logits_to_keep", "num_logits_to_keep")


def keep_logits(model, n: int) -> dict[str, int]:
    """Keyword arguments asking ``model`` for the logits of the last ``n`` positions only
    ({} when it cannot: it then returns them all)."""
    params = inspect.signature(model.forward).parameters
    name = next((k for k in KEEP_NAMES if k in params), None)
    return {name: n} if name else {}


def pad_id(tokenizer) -> int:
    """The pad id of ``tokenizer`` (0 when it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def not_finite_why(model) -> str:
    """The likely cause of a NaN or infinite forward, and the fix, for an error message."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.float64:
        return ("In float64, a padded batch of a model that takes its attention softmax in "
                "float32 (Gemma-2) comes out NaN: run in float32 (--dtype float32) or one "
                "sequence per batch (--batch-size 1).")
    return ("Check the model's weights and dtype (float16 overflows in some models; try "
            "--dtype float32).")


def require_finite(values: Tensor, what: str, model) -> None:
    """One clear error when ``values`` (what a stage computed from ``model``'s forwards, named
    by ``what``) hold NaN or inf, instead of writing them to the run."""
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise LatentAuditError(f"{what}: {bad} of {values.numel()} values are not finite. "
                               f"{not_finite_why(model)}")
