"""Steering vectors: α times the sum of the steered latents' unit decoder directions.

1. d_i = W_dec[i] / ‖W_dec[i]‖ (the direction attribution scores, METHOD.md).
2. A condition steering latents S with signed strength s adds v = α Σ_{i∈S} d_i at the SAE's
   hook point (resid_post, resid_pre, attn_out or mlp_out of layer L) at every position, with
   α = s (absolute scale) or α = s · r̄ (relative scale, the default), where r̄ is the mean norm
   of the activation at that same point: the mean of ‖h_t‖ over the tokens of reference text,
   leaving out each sequence's first position (its norm is an outlier in many models). So a
   strength means the same share of what flows through that point across models and layers.
   r̄ is measured by :func:`latentaudit.models.norm.mean_resid_norm` (explain uses it too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit.steer.config import Condition


def condition_vectors(conditions: Sequence[Condition],
                      directions: Float[Tensor, "d_sae d_model"]) -> Float[Tensor, "n d_model"]:
    """One vector per condition: alpha · Σ d_i over its latents (zero for the baseline)."""
    out = torch.zeros(len(conditions), directions.shape[1], dtype=torch.float32)
    for row, c in enumerate(conditions):
        if c.latents and c.alpha:
            out[row] = c.alpha * directions[list(c.latents)].float().sum(0)
    return out
