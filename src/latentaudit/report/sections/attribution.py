"""The attribution section: the run's provenance, the Δ scatter and the ranked latents.

1. Read ``manifest.json`` (model, SAEs, layers, dataset, counts, options, versions),
   ``ranking.jsonl`` and ``attribution.safetensors`` (Δ-attribution and Δ-activation of every
   latent; names end in ``_layer{L}`` when the run has several layers). These files are required.
2. Provenance rows, one scatter per layer (:func:`~latentaudit.report.figures.attribution_scatter`)
   and the base columns of the ranked-latents table.
3. :func:`complete` adds table cells for latents other sections name outside the ranking (e.g.
   the random latents of a steering sweep), from the full Δ vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from latentaudit.errors import LatentAuditError
from latentaudit.report import figures
from latentaudit.runfolder import RANKING, RunFolder

FIX = "pass the --out folder of a finished `latentaudit attribute` run."
COLUMNS = [
    {"key": "rank", "label": "rank", "title": "rank by Δ-attribution", "kind": "int",
     "first": "asc"},
    {"key": "layer", "label": "layer", "title": "layer of the SAE", "kind": "int", "first": "asc"},
    {"key": "latent", "label": "latent", "title": "latent id (opens its details)",
     "kind": "int", "first": "asc"},
    {"key": "delta_attribution", "label": "Δ-attribution",
     "title": "first-order change of the positive−negative loss gap when the latent is "
              "mean-ablated", "kind": "num", "first": "desc"},
    {"key": "delta_activation", "label": "Δ-activation",
     "title": "mean activation on positive minus negative completions", "kind": "num",
     "first": "desc"},
    {"key": "delta_activation_rank", "label": "Δ-act. rank",
     "title": "rank by Δ-activation among all latents", "kind": "int", "first": "asc"},
    {"key": "lens", "label": "logit lens", "title": "tokens whose unembedding has the largest "
     "cosine with the decoder direction", "kind": "tokens", "first": "asc"},
]


def load(run: Path) -> dict[str, Any]:
    """The section's dict (step 1 and 2 of the module docstring)."""
    folder = RunFolder.open(run, "--run")
    manifest, layers = folder.manifest, folder.layers
    ranking = sorted(folder.ranking, key=lambda r: (
        layers.index(r["layer"]) if r["layer"] in layers else 0, r["rank"]))
    vectors = {L: {"delta_attribution": folder.delta_attribution(L, "np").astype(np.float64),
                   "delta_activation": _wide(folder.delta_activation(L, "np"))}
               for L in layers}
    _check_ranking(run, ranking, vectors)
    data = {"path": str(run), "manifest": manifest, "layers": layers, "ranking": ranking,
            "vectors": vectors, "model": (manifest.get("model") or {}).get("name", "?"),
            "provenance": provenance(manifest), "counts": manifest.get("counts") or {},
            "figures": [], "columns": COLUMNS, "cells": {}, "latents": {}}
    for L in layers:
        v = vectors[L]
        if v["delta_activation"] is not None:
            ranked = [r["latent"] for r in ranking if r["layer"] == L]
            data["figures"].append({"layer": L, "uri": figures.attribution_scatter(
                v["delta_attribution"], v["delta_activation"], ranked, L)})
    complete(data, [(r["layer"], r["latent"]) for r in ranking])
    return data


def _wide(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else x.astype(np.float64)


def _check_ranking(run: Path, ranking: list[dict], vectors: dict) -> None:
    for n, r in enumerate(ranking, start=1):
        if r["layer"] not in vectors or not 0 <= r["latent"] < len(
                vectors[r["layer"]]["delta_attribution"]):
            raise LatentAuditError(f"{run / RANKING}: row {n} names layer {r['layer']} "
                                   f"latent {r['latent']}, which the run's manifest and "
                                   f"attribution.safetensors do not have; {FIX}")


def model_title(name: str) -> str:
    """A model's name as the page shows it: an embedded model's short name with the model it
    is (the default's short name does not say it is the Coder variant)."""
    from latentaudit.models.embedded import EMBEDDED, canonical

    model = EMBEDDED.get(canonical(str(name)))
    return f"{name} ({model.description.split(',')[0]})" if model else str(name)


def provenance(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: model, SAEs, dataset, options and versions."""
    m = manifest.get("model") or {}
    rows = [("model", f"{model_title(m.get('name'))} ({m.get('path')})"),
            ("d_model, dtype", f"{m.get('d_model')}, {m.get('dtype')}"),
            ("layers", ", ".join(map(str, manifest.get("layers", [])))),
            ("hook", str(manifest.get("hook", "resid_post")))]
    for L, sae in (manifest.get("saes") or {}).items():
        abar = (manifest.get("abar_source") or {}).get(L)
        rows.append((f"SAE, layer {L}", f"{sae.get('path')} ({sae.get('format')}, d_sae "
                     f"{sae.get('d_sae')}, {sae.get('activation')}"
                     + (f", k {sae['k']}" if sae.get("k") else "") + f"; ā from {abar})"))
        if isinstance(sae.get("hub"), dict):
            hub = sae["hub"]
            rows.append((f"SAE source, layer {L}", f"{hub.get('repo')} at revision "
                         f"{hub.get('revision')}, {hub.get('path') or '/'}"))
    ds = manifest.get("dataset") or {}
    rows.append(("dataset", f"{ds.get('path')} (sha256 {ds.get('sha256')})"))
    rows.append(("options", ", ".join(f"{k}={v}" for k, v in
                                      (manifest.get("options") or {}).items())))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in
                                       (manifest.get("versions") or {}).items())))
    return rows


def complete(data: dict[str, Any], keys: list[tuple[int, int]]) -> None:
    """Table cells and drill-down rows for ``keys`` (step 3), from the ranking when a latent is
    in it, else from the Δ vectors."""
    ranked = {(r["layer"], r["latent"]): r for r in data["ranking"]}
    act_rank = {}
    for L, v in data["vectors"].items():
        if v["delta_activation"] is not None:
            order = np.argsort(-v["delta_activation"], kind="stable")
            act_rank[L] = np.empty(len(order), dtype=int)
            act_rank[L][order] = np.arange(1, len(order) + 1)
    for key in keys:
        L, i = key
        if key in data["cells"] or L not in data["vectors"] or \
                not 0 <= i < len(data["vectors"][L]["delta_attribution"]):
            continue
        v, r = data["vectors"][L], ranked.get(key, {})
        cell = {"rank": r.get("rank"), "layer": L, "latent": i,
                "delta_attribution": float(v["delta_attribution"][i]),
                "delta_activation": None if v["delta_activation"] is None
                else float(v["delta_activation"][i]),
                "delta_activation_rank": int(act_rank[L][i]) if L in act_rank else None,
                "lens": list(r.get("logit_lens_top_tokens") or []),
                "neuronpedia": r.get("neuronpedia_url") or _neuronpedia(data, L, i)}
        data["cells"][key] = cell
        data["latents"][key] = cell


def _neuronpedia(data: dict[str, Any], layer: int, latent: int) -> str | None:
    """A latent's Neuronpedia page from the manifest's SAE entry (runs whose ranking predates
    the field, and latents outside the ranking)."""
    from latentaudit.saes.releases import neuronpedia_url

    np_id = ((data["manifest"].get("saes") or {}).get(str(layer)) or {}).get("neuronpedia_id")
    return neuronpedia_url(np_id, latent) if isinstance(np_id, str) and np_id else None
