"""Pure tensor functions of the circuit stage (see the package docstring for the algorithm).

Shapes: ``k`` targets, ``batch pos d_model`` activations, ``d_sae`` upstream latents.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentaudit.attribution.math import deltas_from_moments


def _wide(x: Tensor) -> Tensor:
    """float32 at least (half precision is widened; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def loss_cotangents(grads: Float[Tensor, "batch pos d_model"],
                    directions: Float[Tensor, "k d_model"], mask: Bool[Tensor, "batch pos"]
                    ) -> Float[Tensor, "k batch pos d_model"]:
    """∂y_i/∂a_t for the target's contribution to the loss,
    y_i = Σ_{t∈mask} (g_t·d_i)((a_t − ā)·d_i) with g held at its clean value: (g_t·d_i) d_i where
    ``mask``, 0 elsewhere."""
    d = directions.to(grads)
    coef = torch.einsum("btd,kd->kbt", grads, d) * mask.to(grads)  # (K, B, T)
    return coef[..., None] * d[:, None, None, :]


def preactivation_cotangents(sae, acts: Float[Tensor, "batch pos d_model"], targets: list[int],
                             mask: Bool[Tensor, "batch pos"]
                             ) -> Float[Tensor, "k batch pos d_model"]:
    """∂y_i/∂a_t for y_i = Σ_{t∈mask} of the SAE encoder's pre-activation of latent i (one small
    backward per target through the encoder; W_enc[:, i] at every masked position when the SAE
    does not normalise its input)."""
    x = acts.detach().to(sae.W_enc.dtype).requires_grad_(True)
    with torch.enable_grad():
        pre = sae.pre_activation(x)[..., targets] * mask[..., None].to(x)  # (B, T, K)
        out = [torch.autograd.grad(pre[..., n].sum(), x, retain_graph=n < len(targets) - 1)[0]
               for n in range(len(targets))]
    return torch.stack(out).to(acts.dtype)


class EdgeMoments(NamedTuple):
    """Weighted cotangent–activation moments of one batch, one per target."""

    M_raw: Float[Tensor, "k d_model d_model"]
    """Σ_b w_b Σ_{t∈mask} u_t a_tᵀ per target, u = ∂y_i/∂a (the vector-Jacobian product)."""
    u_sum: Float[Tensor, "k d_model"]
    """Σ_b w_b Σ_{t∈mask} u_t per target."""


def edge_moments(cotangents: Float[Tensor, "k batch pos d_model"],
                 acts: Float[Tensor, "batch pos d_model"], weights: Float[Tensor, " batch"],
                 mask: Bool[Tensor, "batch pos"]) -> EdgeMoments:
    """The moments of every target at once (one batched matmul)."""
    K, D = cotangents.shape[0], cotangents.shape[-1]
    sel = mask.reshape(-1).nonzero().squeeze(1)  # (N,)
    u = _wide(cotangents.reshape(K, -1, D)[:, sel])  # (K, N, D)
    w = weights[:, None].expand(mask.shape).reshape(-1)[sel].to(u.dtype)  # (N,)
    u = u * w[None, :, None]
    a = _wide(acts.reshape(-1, D)[sel]).to(u.dtype)  # (N, D)
    return EdgeMoments(u.transpose(1, 2) @ a, u.sum(1))


def center_stacked(M_raw: Float[Tensor, "k d_model d_model"], u_sum: Float[Tensor, "k d_model"],
                   a_bar: Float[Tensor, " d_model"]) -> Float[Tensor, "k d_model d_model"]:
    """M^(i) = M_raw^(i) − s^(i) āᵀ, i.e. Σ w u (a − ā)ᵀ for every target."""
    return M_raw - u_sum[:, :, None] * a_bar.to(M_raw)[None, None, :]


def edges_from_moments(M: Float[Tensor, "k d_model d_model"],
                       directions: Float[Tensor, "d_sae d_model"]) -> Float[Tensor, "k d_sae"]:
    """e_{j→i} = −d_jᵀ M^(i) d_j for every target i and upstream direction j."""
    return torch.stack([deltas_from_moments(M[i], directions) for i in range(M.shape[0])])


class Pruned(NamedTuple):
    """Which edges pruning keeps, per target."""

    keep: Bool[Tensor, "k d_sae"]
    total: Float[Tensor, " k"]
    """Σ_j |e_{j→i}| over every upstream latent."""
    kept: Float[Tensor, " k"]
    """Σ_j |e_{j→i}| over the kept edges."""


def prune_edges(edges: Float[Tensor, "k d_sae"], fraction: float, max_edges: int = 0) -> Pruned:
    """For each target, the fewest strongest incoming edges whose |e| add up to at least
    ``fraction`` of its total absolute attribution, at most ``max_edges`` of them (0: no cap).
    Zero edges are never kept."""
    mag = edges.abs().double()  # (K, S)
    order = mag.argsort(dim=1, descending=True, stable=True)  # (K, S)
    sorted_mag = mag.gather(1, order)
    total = mag.sum(1)  # (K,)
    cum = sorted_mag.cumsum(1)  # (K, S)
    n = (cum < fraction * total[:, None]).sum(1) + 1  # (K,)
    n = torch.minimum(n, (mag > 0).sum(1))
    if max_edges:
        n = n.clamp(max=max_edges)
    ranks = torch.arange(mag.shape[1], device=mag.device)[None, :]  # (1, S)
    keep = torch.zeros_like(mag, dtype=torch.bool).scatter(1, order, ranks < n[:, None])
    return Pruned(keep, total, (mag * keep).sum(1))


def next_targets(edges: Float[Tensor, "k d_sae"], keep: Bool[Tensor, "k d_sae"], top_k: int
                 ) -> list[int]:
    """The ``top_k`` upstream latents with the largest kept |e| summed over the targets, largest
    first: the targets of the next hop down a chain."""
    weight = (edges.abs().double() * keep).sum(0)  # (S,)
    order = weight.argsort(descending=True, stable=True)[:top_k]
    return [int(j) for j in order if weight[j] > 0]
