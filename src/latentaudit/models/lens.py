"""The logit lens of a latent: which tokens its decoder direction d_i points at.

1. Cosine lens (METHOD.md, "Reading a latent"; also used by the attribution ranking): the tokens
   whose unembedding rows have the largest cosine similarity with d_i.
2. Promoted / suppressed tokens: the logit change per unit of the direction, W_U d_i, largest and
   smallest. With ``through_final_norm`` the direction first goes through the model's final norm
   as a linear map, n(d_i) − n(0) (RMSNorm: γ ⊙ d_i / rms(d_i); LayerNorm: its centring and γ,
   without the bias), which is how the residual stream reaches the unembedding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor


class LensTokens(NamedTuple):
    """Top tokens of each latent by cosine between d_i and the unembedding rows."""

    token_ids: Int[Tensor, "n k"]
    cosines: Float[Tensor, "n k"]


def logit_lens(directions: Float[Tensor, "n d_model"], unembed: Float[Tensor, "vocab d_model"],
               k: int = 10, chunk: int = 1024) -> LensTokens:
    """The ``k`` vocabulary rows with the largest cosine with each direction."""
    W = unembed.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (V, D)
    ids, cos = [], []
    for start in range(0, directions.shape[0], chunk):
        d = directions[start:start + chunk].to(W.device, torch.float32)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, D)
        top = (d @ W.T).topk(min(k, W.shape[0]), dim=1)  # (n, k)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return LensTokens(torch.cat(ids), torch.cat(cos))


class PromotedTokens(NamedTuple):
    """The tokens whose logits a direction raises most and lowers most."""

    promoted_ids: Int[Tensor, "n k"]
    promoted: Float[Tensor, "n k"]
    """W_U d_i at the promoted tokens, largest first."""
    suppressed_ids: Int[Tensor, "n k"]
    suppressed: Float[Tensor, "n k"]
    """W_U d_i at the suppressed tokens, most negative first."""


def promoted_suppressed(directions: Float[Tensor, "n d_model"],
                        unembed: Float[Tensor, "vocab d_model"], k: int = 10
                        ) -> PromotedTokens:
    """Top and bottom ``k`` tokens of the logit change W_U d_i of each direction (step 2)."""
    W = unembed.detach().float()  # (V, D)
    logits = directions.to(W.device, torch.float32) @ W.T  # (n, V)
    k = min(k, W.shape[0])
    top = logits.topk(k, dim=1)
    bottom = logits.topk(k, dim=1, largest=False)
    return PromotedTokens(top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(),
                          bottom.values.cpu())


def through_norm(directions: Float[Tensor, "n d_model"], norm: torch.nn.Module
                 ) -> Float[Tensor, "n d_model"]:
    """n(d) − n(0): the final norm as a linear map of a direction (its bias removed)."""
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    d = directions.to(dtype=dtype, device=param.device if param is not None else "cpu")
    with torch.no_grad():
        return (norm(d) - norm(torch.zeros_like(d[:1]))).float()


def unembedding(model) -> Float[Tensor, "vocab d_model"]:
    """The output embedding matrix of a Hugging Face causal LM."""
    return model.get_output_embeddings().weight


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Readable strings of single tokens (byte-level markers decoded)."""
    return [tokenizer.decode([i]) for i in ids]
