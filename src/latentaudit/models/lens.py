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


CHUNK_BYTES = 1 << 26
"""Bytes of float32 (directions × vocabulary) scores held at once."""


def _rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _float_rows(W: Tensor):
    """``W`` as float32 in slices of rows (the whole of it when it is float32 already, so
    neither path holds a float32 copy of a half-precision unembedding)."""
    step = W.shape[0] if W.dtype == torch.float32 else _rows(W.shape[1])
    for start in range(0, W.shape[0], step):
        yield W[start:start + step].float()


def _scores(d: Float[Tensor, "n d_model"], W: Float[Tensor, "vocab d_model"]
            ) -> Float[Tensor, "n vocab"]:
    """d Wᵀ in float32."""
    return torch.cat([d @ w.T for w in _float_rows(W)], dim=1)


def logit_lens(directions: Float[Tensor, "n d_model"], unembed: Float[Tensor, "vocab d_model"],
               k: int = 10) -> LensTokens:
    """The ``k`` vocabulary rows with the largest cosine with each direction: (d/|d|) · W_v
    divided by |W_v|, in chunks of directions, with no normalised copy of the unembedding."""
    W = unembed.detach()
    inv = 1.0 / torch.cat([w.norm(dim=1) for w in _float_rows(W)]).clamp_min(1e-12)  # (V,)
    ids, cos, step = [], [], _rows(W.shape[0])
    for start in range(0, directions.shape[0], step):
        d = directions[start:start + step].to(W.device, torch.float32)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, D)
        top = (_scores(d, W) * inv).topk(min(k, W.shape[0]), dim=1)  # (n, k)
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
    W = unembed.detach()  # (V, D)
    k = min(k, W.shape[0])
    parts: list[tuple] = []
    step = _rows(W.shape[0])
    for start in range(0, directions.shape[0], step):
        d = directions[start:start + step].to(W.device, torch.float32)
        logits = _scores(d, W)  # (n, V)
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(),
                      bottom.values.cpu()))
    return PromotedTokens(*(torch.cat(col) for col in zip(*parts, strict=True)))


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
