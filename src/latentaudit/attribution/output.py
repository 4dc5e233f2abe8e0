"""Write an attribution result into a run folder (the writer only writes: the ranking and its
logit lens are part of the result).

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

import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from latentaudit._io import save_safetensors, write_json, write_jsonl
from latentaudit.attribution.config import AttributionResult
from latentaudit.runfolder import MANIFEST as MANIFEST_FILE
from latentaudit.runfolder import RANKING as RANKING_FILE
from latentaudit.runfolder import SCHEMA_VERSION, tensor_name
from latentaudit.runfolder import TENSORS as TENSORS_FILE


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    from latentaudit import __version__

    return {"latentaudit": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _hook(result: AttributionResult) -> str | dict[str, str]:
    """The hook point every layer read (one name), or {layer: point} when they differ."""
    points = {str(L): la.sae.hook for L, la in result.layers.items()}
    return next(iter(points.values())) if len(set(points.values())) <= 1 else points


def sae_origin(info) -> dict[str, Any]:
    """A hub SAE's repo, revision and file digests, and its Neuronpedia id, when known."""
    out = {"hub": info.hub} if info.hub else {}
    if info.extra.get("neuronpedia_id"):
        out["neuronpedia_id"] = info.extra["neuronpedia_id"]
    return out


def manifest(result: AttributionResult) -> dict[str, Any]:
    """The manifest.json content."""
    m = result.model
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": "attribute",
        "model": {"name": m.name, "path": m.path, "d_model": m.d_model, "dtype": m.dtype,
                  **({"adapter": m.adapter} if m.adapter else {})},
        "saes": {str(L): {"path": la.sae.source_path, "format": la.sae.source_format,
                          "d_sae": la.delta_attribution.numel(), "activation": la.sae.activation,
                          "k": la.sae.k, **sae_origin(la.sae)}
                 for L, la in result.layers.items()},
        "layers": list(result.layers),
        "hook": _hook(result),
        "abar_source": {str(L): la.abar_source for L, la in result.layers.items()},
        "dataset": result.dataset,
        "counts": {"completions": result.n_completions, "pairs": result.n_pairs,
                   "prompts": result.n_prompts, "tokens": result.n_tokens,
                   "completion_tokens": result.n_completion_tokens,
                   "skipped_prompts": len(result.skipped_prompts)},
        "options": asdict(result.config),
        "versions": _versions(),
    }


def write_run(out: str | os.PathLike, result: AttributionResult) -> None:
    """Write the three files into ``out``, each atomically."""
    out = Path(out)
    several = len(result.layers) > 1
    tensors = {}
    for L, la in result.layers.items():
        for name in ("delta_attribution", "delta_activation", "moment_matrix", "a_bar"):
            if getattr(la, name) is not None:
                tensors[tensor_name(name, L, several)] = getattr(la, name).float()
    save_safetensors(out / TENSORS_FILE, tensors, metadata={"schema_version": str(SCHEMA_VERSION)})
    write_jsonl(out / RANKING_FILE, (asdict(row) for row in result.ranking))
    write_json(out / MANIFEST_FILE, manifest(result))
