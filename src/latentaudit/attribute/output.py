"""Write an attribution result into a run folder.

Files (schema_version 1):

- ``attribution.safetensors``: float32 ``delta_attribution`` [d_sae], ``delta_activation``
  [d_sae], ``moment_matrix`` [d_model, d_model] (M, ā already subtracted: contract it with another
  SAE's decoder of the same layer to attribute without rerunning the model) and ``a_bar``
  [d_model]. With several layers every name gets the suffix ``_layer{L}``.
- ``ranking.jsonl``: one line per top latent (per layer): ``layer``, ``latent``, ``rank``,
  ``delta_attribution``, ``delta_activation``, ``delta_activation_rank`` and
  ``logit_lens_top_tokens`` (the 10 tokens whose unembedding rows have the largest cosine with d_i).
- ``manifest.json``: schema version, model, SAEs, layers, ā source, dataset hash, counts, options
  and package versions.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path

import torch

from latentaudit._io import save_safetensors, write_json, write_jsonl
from latentaudit.attribute.config import AttributionConfig, AttributionResult
from latentaudit.explain import logit_lens, token_strings, unembedding

SCHEMA_VERSION = 1
TENSORS_FILE = "attribution.safetensors"
RANKING_FILE = "ranking.jsonl"
MANIFEST_FILE = "manifest.json"


def tensor_name(name: str, layer: int, several: bool) -> str:
    """``name`` or ``name_layer{L}`` when the result has several layers."""
    return f"{name}_layer{layer}" if several else name


def ranking_rows(result: AttributionResult, saes: dict, model, top_k: int) -> list[dict]:
    """The top ``top_k`` latents of each layer by Δ-attribution, with their logit-lens tokens."""
    rows = []
    W_U = unembedding(model.model)
    for L, la in result.layers.items():
        top = la.top(top_k)
        act = la.delta_activation
        act_rank = None
        if act is not None:
            act_rank = torch.empty_like(act, dtype=torch.long)
            act_rank[act.argsort(descending=True)] = torch.arange(act.numel())
        dirs = saes[L].decoder_directions()[top]  # (k, D)
        lens = logit_lens(dirs.to(W_U.device), W_U, k=10)
        for rank, (latent, ids) in enumerate(zip(top, lens.token_ids.tolist(), strict=True), 1):
            rows.append({
                "layer": L, "latent": latent, "rank": rank,
                "delta_attribution": float(la.delta_attribution[latent]),
                "delta_activation": None if act is None else float(act[latent]),
                "delta_activation_rank": None if act is None else int(act_rank[latent]) + 1,
                "logit_lens_top_tokens": token_strings(model.tokenizer, ids),
            })
    return rows


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    from latentaudit import __version__

    return {"latentaudit": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def manifest(result: AttributionResult, saes: dict, model, cfg: AttributionConfig,
             dataset: dict) -> dict:
    """The manifest.json content."""
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": "attribute",
        "model": {"name": model.name, "path": model.path, "d_model": model.d_model,
                  "dtype": str(next(model.model.parameters()).dtype).replace("torch.", "")},
        "saes": {str(L): {"path": s.info.source_path, "format": s.info.source_format,
                          "d_sae": s.d_sae, "activation": s.info.activation, "k": s.info.k}
                 for L, s in saes.items()},
        "layers": list(result.layers),
        "hook": "resid_post",
        "abar_source": {str(L): la.abar_source for L, la in result.layers.items()},
        "dataset": dataset,
        "counts": {"completions": result.n_completions, "pairs": result.n_pairs,
                   "prompts": result.n_prompts, "tokens": result.n_tokens,
                   "completion_tokens": result.n_completion_tokens,
                   "skipped_prompts": len(result.skipped_prompts)},
        "options": asdict(cfg),
        "versions": _versions(),
    }


def write_run(out: str | Path, result: AttributionResult, saes: dict, model,
              cfg: AttributionConfig, dataset: dict) -> list[dict]:
    """Write the three files into ``out`` (atomically); return the ranking rows."""
    out = Path(out)
    several = len(result.layers) > 1
    tensors = {}
    for L, la in result.layers.items():
        for name in ("delta_attribution", "delta_activation", "moment_matrix", "a_bar"):
            if getattr(la, name) is not None:
                tensors[tensor_name(name, L, several)] = getattr(la, name).float()
    save_safetensors(out / TENSORS_FILE, tensors, metadata={"schema_version": str(SCHEMA_VERSION)})
    rows = ranking_rows(result, saes, model, cfg.top_k)
    write_jsonl(out / RANKING_FILE, rows)
    write_json(out / MANIFEST_FILE, manifest(result, saes, model, cfg, dataset))
    return rows
