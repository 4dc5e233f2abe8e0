"""The latent sets every later stage compares: a ranking's top K and the random null.

1. Top K of a score vector: the K largest, best first, ties broken by the smaller id.
2. Random null: K distinct latents drawn uniformly without replacement from the latents that no
   compared method chose (seeded), so the null never overlaps the sets it is the baseline of.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit.errors import LatentAuditError


def top_latents(scores: Float[Tensor, " d_sae"], k: int) -> list[int]:
    """Ids of the ``k`` largest scores, best first (ties by id)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k].tolist()


def random_latents(d_sae: int, k: int, exclude: set[int],
                   generator: torch.Generator) -> list[int]:
    """``k`` distinct latents drawn uniformly from those not in ``exclude``, sorted."""
    pool = torch.tensor([i for i in range(d_sae) if i not in exclude], dtype=torch.long)
    if len(pool) < k:
        raise LatentAuditError(f"top_k {k}: only {len(pool)} latents are left for the random "
                               "set.")
    return sorted(pool[torch.randperm(len(pool), generator=generator)[:k]].tolist())
