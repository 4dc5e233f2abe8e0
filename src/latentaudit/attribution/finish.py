"""Finish an attribution run: from the loop's sums to the result (steps 5–7 of the package
docstring).

1. Choose ā per layer (stored with the SAE, the dataset's own mean, or zero) and centre the moment
   matrix: M = M_raw − s āᵀ.
2. Contract M with the unit decoder directions: Δ-attribution_i = −d_iᵀ M d_i; Δ-activation from
   the latent sums.
3. Rank the ``top_k`` latents of each layer and read each one's logit lens (the tokens whose
   unembedding rows have the largest cosine with d_i).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentaudit.attribution.accumulate import Accumulators, Sums
from latentaudit.attribution.config import (
    AttributionConfig,
    AttributionResult,
    LayerAttribution,
    ModelSummary,
    RankedLatent,
)
from latentaudit.attribution.math import center, deltas_from_moments
from latentaudit.attribution.plan import Inputs, Plan, no_mean_activation
from latentaudit.batching import free_memory
from latentaudit.models.lens import logit_lens, token_strings, unembedding
from latentaudit.models.load import LoadedModel
from latentaudit.saes.releases import neuronpedia_url
from latentaudit.saes.sae import SAE
from latentaudit.saes.stream import direction_chunks, latent_chunk

LENS_TOKENS = 10
CHUNK_ELEMENTS = 1 << 24
"""Elements of one chunk of unit decoder rows in the final contraction (64 MiB in float32: its
three transient tensors stay under 200 MiB whatever d_sae and d_model, and a chunk of 2,048
rows of d_model 8,192 still runs the matmul at full speed)."""


def finish(model: LoadedModel, inputs: Inputs, plan: Plan, sums: Sums,
           cfg: AttributionConfig) -> AttributionResult:
    """The :class:`AttributionResult` of a finished loop, ranking included."""
    layers = {L: layer_result(L, sae, sums.acc[L], cfg) for L, sae in inputs.saes.items()}
    first = sums.acc[next(iter(layers))]
    data, pairs = inputs.data, inputs.pairing.pairs
    return AttributionResult(
        layers=layers, n_completions=len(plan.used), n_pairs=len(pairs),
        n_prompts=len({data[i].prompt_id for p in pairs for i in p}),
        n_tokens=int(first.counts[0].item()),
        n_completion_tokens=sum(len(q) for _, q in plan.seqs),
        skipped_prompts=inputs.pairing.skipped_prompts, completion_losses=sums.losses.tolist(),
        ranking=ranking(layers, inputs.saes, model, cfg.top_k),
        model=ModelSummary(name=model.name, path=model.path, d_model=model.d_model,
                           dtype=str(next(model.model.parameters()).dtype).replace("torch.", ""),
                           adapter=getattr(model, "adapter", None)),
        config=cfg, dataset=inputs.dataset)


def layer_result(layer: int, sae: SAE, acc: Accumulators,
                 cfg: AttributionConfig) -> LayerAttribution:
    """Δ-attribution and Δ-activation at one layer from its accumulators."""
    a_bar, source = choose_abar(cfg.abar, sae, acc)
    M = center(acc.M_raw, acc.g_sum, a_bar)
    n_pos, n_neg = acc.counts[1].clamp_min(1), acc.counts[2].clamp_min(1)
    activation = ((acc.f_pos / n_pos - acc.f_neg / n_neg).float().cpu()
                  if cfg.delta_activation else None)
    return LayerAttribution(
        layer=layer, delta_attribution=contract(M, sae, cfg.sae_chunk).cpu(),
        delta_activation=activation, moment_matrix=M.float().cpu(), a_bar=a_bar.float().cpu(),
        abar_source=source, sae=sae.info)


def contract(M: Tensor, sae: SAE, chunk: int = 0,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Δ-attribution −d_iᵀ M d_i of every latent on M's device, the decoder streamed in chunks
    of ``chunk`` latents (0: CHUNK_ELEMENTS / d_model when the SAE is on M's device, else sized
    from free memory, at most that); each latent's value does not depend on the chunking."""
    if not chunk:
        free = free_memory(M.device)
        chunk = max(1, CHUNK_ELEMENTS // sae.d_model)  # 64 MiB per float32 chunk tensor
        if sae.W_dec.device != M.device and free is not None:
            chunk = min(chunk, latent_chunk(sae, free))
    out = torch.empty(sae.d_sae, dtype=dtype, device=M.device)
    for s, d in direction_chunks(sae, chunk, M.device, dtype):
        out[s:s + d.shape[0]] = deltas_from_moments(M, d, dtype=dtype)
    return out


def choose_abar(source: str, sae: SAE, acc: Accumulators) -> tuple[Tensor, str]:
    """ā and the name of its source."""
    if source == "auto":
        source = "sae" if sae.mean_activation is not None else "dataset"
    if source == "sae":
        if sae.mean_activation is None:
            raise no_mean_activation(sae)
        return sae.mean_activation.detach().double().to(acc.M_raw.device), "sae"
    if source == "dataset":
        return acc.a_sum / acc.counts[0].clamp_min(1), "dataset"
    return torch.zeros_like(acc.g_sum), "zero"


def ranking(layers: dict[int, LayerAttribution], saes: dict[int, SAE], model: LoadedModel,
            top_k: int) -> list[RankedLatent]:
    """The ``top_k`` latents of each layer by Δ-attribution, with their logit-lens tokens."""
    rows = []
    W_U = unembedding(model.model)
    for L, la in layers.items():
        top = la.top(top_k)
        act = la.delta_activation
        act_rank = None
        if act is not None:
            act_rank = torch.empty_like(act, dtype=torch.long)
            act_rank[act.argsort(descending=True)] = torch.arange(act.numel())
        np_id = saes[L].info.extra.get("neuronpedia_id")
        dirs = saes[L].decoder_directions(rows=top)  # (k, D)
        lens = logit_lens(dirs.to(W_U.device), W_U, k=LENS_TOKENS)
        for rank, (latent, ids) in enumerate(zip(top, lens.token_ids.tolist(), strict=True), 1):
            rows.append(RankedLatent(
                layer=L, latent=latent, rank=rank,
                delta_attribution=float(la.delta_attribution[latent]),
                delta_activation=None if act is None else float(act[latent]),
                delta_activation_rank=None if act_rank is None else int(act_rank[latent]) + 1,
                logit_lens_top_tokens=token_strings(model.tokenizer, ids),
                neuronpedia_url=neuronpedia_url(np_id, latent) if np_id else None))
    return rows
