"""Pure tensor functions of attribution (see the package docstring for the algorithm)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def _wide(x: Tensor) -> Tensor:
    """float32 at least (half precision is widened; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


class Moments(NamedTuple):
    """Weighted gradient–activation moments of one batch at one layer."""

    M_raw: Float[Tensor, "d_model d_model"]
    """Σ w_b g_t a_tᵀ over selected positions."""
    g_sum: Float[Tensor, " d_model"]
    """Σ w_b g_t over selected positions."""


def batch_moments(grads: Float[Tensor, "batch pos d_model"],
                  acts: Float[Tensor, "batch pos d_model"],
                  weights: Float[Tensor, " batch"], mask: Bool[Tensor, "batch pos"]) -> Moments:
    """Moments Σ_b w_b Σ_{t in mask} g_t a_tᵀ and Σ_b w_b Σ_t g_t (one matmul).

    Positions outside ``mask`` get weight 0 instead of being selected out, so the device never
    waits for the host to count them.
    """
    D = grads.shape[-1]
    g = _wide(grads).reshape(-1, D)  # (B*T, D)
    wm = (weights[:, None].to(g.dtype) * mask.to(g.dtype)).reshape(-1)  # (B*T,)
    g = g * wm[:, None]
    a = _wide(acts).reshape(-1, D).to(g.dtype)  # (B*T, D)
    return Moments(g.T @ a, g.sum(0))


def center(M_raw: Float[Tensor, "d_model d_model"], g_sum: Float[Tensor, " d_model"],
           a_bar: Float[Tensor, " d_model"]) -> Float[Tensor, "d_model d_model"]:
    """M = M_raw − s āᵀ, i.e. Σ w g (a − ā)ᵀ."""
    return M_raw - torch.outer(g_sum, a_bar.to(M_raw))


def deltas_from_moments(M: Float[Tensor, "d_model d_model"],
                        directions: Float[Tensor, "d_sae d_model"],
                        chunk: int = 65536, dtype: torch.dtype = torch.float32
                        ) -> Float[Tensor, " d_sae"]:
    """δ_i = −d_iᵀ M d_i for every direction, in chunks of rows, in ``dtype``."""
    M = M.to(directions.device, dtype)
    out = torch.empty(directions.shape[0], dtype=dtype, device=directions.device)
    for start in range(0, directions.shape[0], chunk):
        d = directions[start:start + chunk].to(dtype)  # (n, D)
        out[start:start + chunk] = -((d @ M) * d).sum(1)
    return out


def token_deltas(grads: Float[Tensor, "pos d_model"], acts: Float[Tensor, "pos d_model"],
                 a_bar: Float[Tensor, " d_model"], directions: Float[Tensor, "d_sae d_model"]
                 ) -> Float[Tensor, "pos d_sae"]:
    """The per-token route: δ_{i,t} = −(g_t·d_i)((a_t − ā)·d_i) (reference; costs T·d_sae·D)."""
    dirs = _wide(directions)
    G = _wide(grads).to(dirs.dtype) @ dirs.T  # (T, S)
    A = (_wide(acts) - _wide(a_bar)).to(dirs.dtype) @ dirs.T  # (T, S)
    return -G * A


def completion_losses(logits: Float[Tensor, "batch k vocab"], targets: Tensor,
                      target_mask: Bool[Tensor, "batch k"]) -> Float[Tensor, " batch"]:
    """Mean cross-entropy of each row's completion tokens (positions where target_mask), in
    float32 at least."""
    ce = torch.nn.functional.cross_entropy(
        _wide(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape) * target_mask  # (B, k)
    return ce.sum(1) / target_mask.sum(1).clamp_min(1)


