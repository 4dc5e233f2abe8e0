"""Explain latents: the logit lens of a decoder direction (top-activating text lives here too).

Logit lens (METHOD.md, "Reading a latent"): the tokens whose unembedding rows have the largest
cosine similarity with the latent's unit decoder direction d_i.
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


def unembedding(model) -> Float[Tensor, "vocab d_model"]:
    """The output embedding matrix of a Hugging Face causal LM."""
    return model.get_output_embeddings().weight


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Readable strings of single tokens (byte-level markers decoded)."""
    return [tokenizer.decode([i]) for i in ids]
