"""What the graph shows on a node: its logit lens and, when there are any, its top-activating text.

1. Logit lens: the tokens whose unembedding rows have the largest cosine with the node's decoder
   direction (as the ranking shows them).
2. Top-activating examples: from explain's per-SAE cache (:mod:`latentaudit.explain.examples`,
   keyed by the SAE, the model, its dtype, the layer and the reference text), read with the
   options of the run's own explain stage; with ``examples`` the pass runs for a layer that has
   no cache yet, otherwise such a layer's nodes have none.
"""

from __future__ import annotations

import logging
import os

from latentaudit.explain import examples as ex
from latentaudit.explain.config import ExplainConfig
from latentaudit.models.lens import logit_lens, token_strings, unembedding
from latentaudit.saes.sae import SAE

log = logging.getLogger(__name__)


def lens_tokens(model, sae: SAE, latents: list[int], k: int) -> dict[int, list[str]]:
    """{latent: its ``k`` logit-lens tokens} (step 1)."""
    if not latents:
        return {}
    W_U = unembedding(model.model)
    lens = logit_lens(sae.decoder_directions()[latents].to(W_U.device), W_U, k=k)
    return {i: token_strings(model.tokenizer, ids)
            for i, ids in zip(latents, lens.token_ids.tolist(), strict=True)}


def dtype_name(model) -> str:
    return str(next(model.model.parameters()).dtype).replace("torch.", "")


def examples_key(sae: SAE, model_name: str, dtype: str, layer: int, cfg: ExplainConfig) -> str:
    return ex.cache_key(sae, model_name, dtype, layer, cfg)


def node_examples(model, sae: SAE, layer: int, latents: list[int], cfg: ExplainConfig,
                  model_name: str, run_pass: bool, shown: int,
                  cache_dir: str | os.PathLike | None) -> dict[int, list[dict]] | None:
    """{latent: its ``shown`` top-activating examples} (step 2), or None when the layer has no
    cached pass and ``run_pass`` is off."""
    from latentaudit.explain.output import example_rows

    key = examples_key(sae, model_name, dtype_name(model), layer, cfg)
    if not ex.is_cached(key, cache_dir) and not run_pass:
        log.info("no cached top-activating examples for layer %d: its nodes show none (pass "
                 "--examples to compute them)", layer)
        return None
    corpus = ex.corpus_examples(model, sae, layer, cfg, key, cache_dir)
    return {i: example_rows(corpus, i, cfg.context_before, model.tokenizer)[:shown]
            for i in latents}
