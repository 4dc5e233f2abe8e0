"""Explain the latents of an attribution run: what they read, what they write, whether δ is right.

Algorithm, for each layer L of the run (SAE decoder rows d_i, unit length; the run's ā):

1. Check every input before the model loads (:mod:`.engine`, :mod:`.run`): the run folder, the
   latents (the top ``top_k`` of ranking.jsonl, or given ids), the SAE, the dataset, the
   reference text (unless its pass is cached) and the options.
2. Logit lens (:mod:`latentaudit.models.lens`): the tokens with the largest cosine with d_i,
   and the tokens W_U d_i promotes and suppresses most (optionally through the final norm).
3. Top-activating examples and density (:mod:`.examples`, :mod:`.topk`): one pass up to layer L
   over the reference text keeps, for every latent, the k largest activations with a context
   window (a streaming top-k: memory d_sae × k × window whatever the text size), how often it
   fires and a histogram of its activations. Cached per SAE, so a second run costs nothing.
4. Per-token attribution maps (:mod:`.maps`) on the completions of a seeded sample of the run's
   pairs: δ_{i,t} = −(g_t·d_i)((a_t − ā)·d_i), by the attribution stage's own forward/backward;
   Σ_t δ_{i,t} = δ_i(C).
5. Exactness check (:mod:`.exact`): on the first ``exact_pairs`` sampled pairs, the exact loss
   change of mean-ablating each latent, a_t → a_t − ((a_t − ā)·d_i) d_i, by rerunning only the
   layers above L with the latents in the batch dimension; Spearman ρ of exact against
   first-order Δ. ``rescore`` K re-ranks the top K by the exact Δ; ``exact_top`` K measures
   the top K too (for ρ) without re-ranking them.
6. Output effect (:mod:`.effect`): on the first ``effect_texts`` completions of the sampled
   pairs, the tokens whose log-probability rises and falls most, through the layers above L,
   when α d_i is added at every position (α = ``effect_strength`` × the mean residual norm) and
   when the latent is mean-ablated: what the latent does to the output, beyond the logit lens.
7. Optional one-line explanations through an OpenAI-compatible endpoint (:mod:`.interpret`).
8. Write the files below (:mod:`.output`), each atomically. :mod:`.across` compares runs of
   one model and SAE: the latents in the top of several.

Files in ``<run>/explain/`` (schema_version 1):

- ``manifest.json``: ``schema_version``, ``stage`` ("explain"), ``run``, ``model``, ``layers``,
  ``latents`` ([{layer, latent}] in file order), ``source`` ("ranking" or "latents"),
  ``positions`` (the run's), ``corpus`` ({``spec``, ``tokens``, ``sequences``, ``context_len``,
  ``skip_first``, ``cache`` {layer: {key, file}}, ``content_warnings``}),
  ``density_histogram_edges`` (31 edges, 1e-3 … 1e3), ``map_columns`` ([{layer, latent}], the
  columns of token_maps and of completions' ``delta``), ``exactness`` ({layer: {route, pairs,
  spearman, spearman_per_completion_mean}}), ``interpretation`` ({model, base_url} or null),
  ``options`` and ``versions``.
- ``latents.jsonl``: one row per explained latent, in final order: ``layer``, ``latent``,
  ``rank`` (in ranking.jsonl, null if absent), ``final_rank`` (after ``--rescore``),
  ``delta_attribution``, ``delta_activation``, ``exact_delta`` and ``first_order_delta`` (on
  the exactness sample; null without it), ``logit_lens`` ({``cosine``: [token],
  ``promoted`` / ``suppressed``: [{token, token_id, value}], ``through_final_norm``}),
  ``output_effect`` ({``strength``, ``alpha``, ``completions`` (dataset lines), ``positions``,
  ``route``, ``added`` and ``ablated``: {``rises`` / ``falls``: [{token, token_id, value (mean
  Δ log p)}]}} or null),
  ``density`` ({``tokens``, ``fired``, ``frequency``, ``histogram``: counts per bin}),
  ``top_examples`` ([{``activation``, ``sequence``, ``position``, ``max_index`` (index of the
  activating token in the window), ``token_ids``, ``tokens``, ``activations``}], largest first),
  ``attribution_map`` ({``mean_positive``, ``mean_negative`` (mean δ_i(C) over the mapped
  positive / negative completions), ``top_tokens``: the completion tokens of positive completions
  with the largest δ_{i,t}, [{completion (row of completions.jsonl), line, position, token,
  delta}]} or null), ``explanation`` (null unless --interpret-model) and, only for an SAE of a
  known public release, ``neuronpedia_url`` (the latent's Neuronpedia page).
- ``token_maps.safetensors``: ``token_delta`` float32 [tokens, columns] (δ_{i,t} of every mapped
  completion, stacked), ``token_ids`` int64 [tokens], ``offsets`` int64 [completions + 1]
  (completion c is rows offsets[c]:offsets[c+1]), ``layers`` and ``latents`` int64 [columns].
- ``completions.jsonl``: one row per mapped completion: ``index``, ``line`` (in the dataset),
  ``prompt_id``, ``label``, ``weight`` (pair weight within the sample), ``offset``,
  ``n_tokens``, ``n_prompt_tokens``, ``tokens``, ``loss`` (ℓ_C), ``delta`` (δ_i(C) per column).
- ``exact.json``: ``schema_version`` and ``layers`` {layer: {``latents``, ``ranks``,
  ``final_ranks``, ``route`` (upper-layers or full-forward), ``completions`` and ``pairs``
  (dataset lines), ``clean_loss`` [completion], ``exact_loss_change`` [completion][latent],
  ``exact_delta`` and ``first_order_delta`` [latent], ``spearman``,
  ``spearman_per_completion``, ``spearman_per_completion_mean``}}.
- ``interpret_cache.jsonl``: cached explanations ({key, model, explanation}), when used.

``across.json`` (``latentaudit explain --across``): ``schema_version``, ``runs``, ``model``,
``top_k``, ``min_runs`` and ``latents`` ([{layer, latent, runs_in_top, mean_rank, ranks,
delta_attribution}], one entry per run in ``ranks`` and ``delta_attribution``).
"""

from latentaudit.explain.across import across_runs
from latentaudit.explain.config import ExplainConfig
from latentaudit.explain.engine import explain_latents
from latentaudit.explain.output import ExplainResult
from latentaudit.models.lens import LensTokens, logit_lens, token_strings, unembedding

__all__ = ["ExplainConfig", "ExplainResult", "LensTokens", "across_runs", "explain_latents",
           "logit_lens", "token_strings", "unembedding"]
