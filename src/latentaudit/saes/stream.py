"""Use an SAE a chunk of latents at a time, its weights on the device or streamed from the host.

An SAE of 2M latents on a d_model 8192 model holds 2 × 2M × 8192 weights (64 GiB in bfloat16),
more than fits next to a large model. Every SAE-side computation of latentaudit is per latent
or can be merged across latents, so it runs on latent chunks whose weights are copied to the
device when needed:

1. :func:`place` moves the whole SAE to the device when its weights fit in the free device
   memory with room to spare (:data:`SAE_SHARE` of it); otherwise the SAE stays in host memory
   (pinned, for fast copies) and :func:`latent_chunk` sizes the chunks from the free memory.
2. :func:`direction_chunks`: unit decoder rows d_i of latents [s, s + n), normalised on the
   device. Attribution's contraction −d_iᵀ M d_i is row by row, so any chunking gives the same
   numbers.
3. :func:`encode_chunks`: latent activations of ``x``, chunk by chunk. relu and jumprelu act per
   latent, so chunk c needs only W_enc[:, c]. TopK needs every latent's pre-activation: a first
   pass over the chunks keeps each token's running top k (a chunk's top k merged with the running
   top k is the top k of their union), then each chunk's activations are the kept values that
   fall in it: the latents and values of a full-width top k (ties aside).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit.batching import free_memory
from latentaudit.saes.sae import SAE

log = logging.getLogger(__name__)

SAE_SHARE = 0.5
"""Largest share of the free device memory the whole SAE may take; beyond it, it is streamed."""
CHUNK_SHARE = 0.1
"""Share of the free device memory one streamed chunk of weights may take."""


def sae_bytes(sae: SAE) -> int:
    """Bytes of the SAE's weights."""
    return sum(t.numel() * t.element_size() for t in sae.state_dict().values())


def place(sae: SAE, device: torch.device | str, chunk: int = 0) -> int:
    """Put ``sae`` where it is used best and return the latents per chunk (step 1).

    ``chunk`` > 0 forces streaming in chunks of that many latents (the SAE stays where it is);
    0 moves the whole SAE to ``device`` when it fits (one chunk of every latent), else keeps it
    in host memory and sizes chunks from the free device memory.
    """
    device = torch.device(device)
    if chunk:
        return min(chunk, sae.d_sae)
    free = free_memory(device)
    if free is None or sae_bytes(sae) <= SAE_SHARE * free:
        sae.to(device)
        return sae.d_sae
    sae.to("cpu")
    if torch.cuda.is_available():
        for p in sae.parameters():
            p.data = p.data.pin_memory()
    n = latent_chunk(sae, free)
    log.info("the SAE (%.1f GiB, %d latents) does not fit next to the model on %s: it stays in "
             "host memory and is streamed %d latents at a time", sae_bytes(sae) / 2**30,
             sae.d_sae, device, n)
    return n


def latent_chunk(sae: SAE, free: int) -> int:
    """Latents per streamed chunk: encoder and decoder columns within CHUNK_SHARE of ``free``."""
    per_latent = 2 * sae.d_model * sae.W_dec.element_size() * 3  # weights + float32 copies
    return max(1, min(sae.d_sae, int(CHUNK_SHARE * free) // per_latent))


def direction_chunks(sae: SAE, chunk: int, device: torch.device | str,
                     dtype: torch.dtype = torch.float32
                     ) -> Iterator[tuple[int, Float[Tensor, "n d_model"]]]:
    """(start, unit decoder rows of latents start..start + n) on ``device`` (step 2)."""
    for s in range(0, sae.d_sae, chunk):
        W = sae.W_dec.detach()[s:s + chunk].to(device, non_blocking=True).to(dtype)  # (n, D)
        yield s, W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _pre(sae: SAE, x: Tensor, s: int, n: int) -> Tensor:
    """Encoder pre-activations of latents s..s + n for prepared inputs ``x`` (N, D)."""
    W = sae.W_enc.detach()[:, s:s + n].to(x.device, non_blocking=True).to(x.dtype)  # (D, n)
    b = sae.b_enc.detach()[s:s + n].to(x.device, non_blocking=True).to(x.dtype)  # (n,)
    return x @ W + b


def _prepare(sae: SAE, x: Tensor) -> Tensor:
    """The encoder's input: normalised, minus b_dec where the SAE subtracts it."""
    dtype = sae.W_enc.dtype if sae.W_enc.dtype == torch.float64 else torch.float32
    x = sae._normalise(x.to(dtype))[0]
    if sae.info.subtract_b_dec:
        x = x - sae.b_dec.detach().to(x.device, dtype)
    return x


def _global_topk(sae: SAE, x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest pre-activations over every latent, and their latent indices."""
    k = sae.info.k
    vals = idx = None
    for s in range(0, sae.d_sae, chunk):
        pre = _pre(sae, x, s, min(chunk, sae.d_sae - s))  # (N, n)
        v, i = pre.topk(min(k, pre.shape[1]), dim=1)
        i = i + s
        if vals is not None:
            v, i = torch.cat([vals, v], 1), torch.cat([idx, i], 1)
        top = v.topk(min(k, v.shape[1]), dim=1)
        vals, idx = top.values, i.gather(1, top.indices)  # (N, k)
    return vals, idx


@torch.no_grad()
def encode_chunks(sae: SAE, x: Float[Tensor, "rows d_model"], chunk: int
                  ) -> Iterator[tuple[int, Float[Tensor, "rows n"]]]:
    """(start, latent activations of latents start..start + n) of ``x`` (step 3).

    Activations are float32 (float64 for a float64 SAE), on ``x``'s device.
    """
    x = _prepare(sae, x)  # (N, D)
    if sae.info.activation == "topk":
        vals, idx = _global_topk(sae, x, chunk)
        vals = torch.relu(vals)
        for s in range(0, sae.d_sae, chunk):
            n = min(chunk, sae.d_sae - s)
            inside = (idx >= s) & (idx < s + n)  # (N, k)
            f = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
            f.scatter_add_(1, (idx - s).clamp(0, n - 1), vals * inside)
            yield s, f
        return
    for s in range(0, sae.d_sae, chunk):
        n = min(chunk, sae.d_sae - s)
        pre = _pre(sae, x, s, n)  # (N, n)
        if sae.info.activation == "relu":
            yield s, torch.relu(pre)
        else:
            thr = sae.threshold[s:s + n].to(x.device, x.dtype)
            yield s, pre * (pre > thr)
