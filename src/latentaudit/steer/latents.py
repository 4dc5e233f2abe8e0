"""Which latents to steer, on which prompts: everything the sweep reads from an attribution run.

1. The run (``manifest.json`` + ``attribution.safetensors`` of ``latentaudit attribute``) gives
   the model, the SAE and its layer, and the full Δ-attribution and Δ-activation vectors.
2. Latent sets, K each: the top-K by Δ-attribution, the top-K by Δ-activation, K random latents
   (uniform without replacement over the other latents, seeded: the null), the top-K of the
   model-diffing baseline (:mod:`latentaudit.steer.diff`), or the ids given.
3. Held-out prompts: the prompts of the sweep minus every prompt_id of the run's dataset, so no
   steered prompt was seen by attribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentaudit.errors import LatentAuditError


@dataclass
class RunInfo:
    """What the sweep needs from an attribution run."""

    folder: Path
    model: str
    sae_path: str
    layer: int
    delta_attribution: Tensor
    delta_activation: Tensor | None
    dataset: Path | None
    ranking: list[dict[str, Any]]


def read_run(folder: str | Path) -> RunInfo:
    """The manifest, the Δ vectors and the ranking of an attribution run (one layer)."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise LatentAuditError(f"--from {folder}: no manifest.json; point it at the --out folder "
                               "of `latentaudit attribute`.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        layers = manifest["layers"]
        model = manifest["model"]["name"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LatentAuditError(f"{mpath}: not an attribution manifest (fields 'layers', "
                               "'model.name').") from None
    if len(layers) != 1:
        raise LatentAuditError(f"{mpath}: field 'layers' lists {layers}; steering reads one "
                               "layer, so attribute one layer per run folder.")
    layer = int(layers[0])
    from safetensors.torch import load_file

    tpath = folder / "attribution.safetensors"
    if not tpath.is_file():
        raise LatentAuditError(f"--from {folder}: no attribution.safetensors.")
    tensors = load_file(tpath)
    dataset = (manifest.get("dataset") or {}).get("path")
    ranking = []
    rpath = folder / "ranking.jsonl"
    if rpath.is_file():
        ranking = [json.loads(line) for line in rpath.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    return RunInfo(folder=folder, model=model, sae_path=manifest["saes"][str(layer)]["path"],
                   layer=layer, delta_attribution=tensors["delta_attribution"],
                   delta_activation=tensors.get("delta_activation"),
                   dataset=_find(dataset, folder) if dataset else None, ranking=ranking)


def _find(path: str, folder: Path) -> Path:
    """A manifest path as written (relative to where attribute ran), else next to the run."""
    p = Path(path)
    for cand in (p, folder / p, folder.parent / p, folder / p.name):
        if cand.is_file():
            return cand
    return p


def top_latents(scores: Tensor, k: int) -> list[int]:
    """Ids of the ``k`` largest scores, best first (ties by id)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k].tolist()


def random_latents(d_sae: int, k: int, seed: int, exclude: set[int]) -> list[int]:
    """``k`` distinct latents drawn uniformly from those not in ``exclude`` (seeded)."""
    pool = torch.tensor([i for i in range(d_sae) if i not in exclude])
    if len(pool) < k:
        raise LatentAuditError(f"--top-k {k}: only {len(pool)} latents are left for the random "
                               "set.")
    g = torch.Generator().manual_seed(seed)
    return sorted(pool[torch.randperm(len(pool), generator=g)[:k]].tolist())


def latent_sets(run: RunInfo | None, methods: tuple[str, ...], k: int, seed: int, d_sae: int,
                given: list[int] | None = None,
                model_diff: Tensor | None = None) -> dict[str, list[int]]:
    """The latents each selection method steers (see the module docstring)."""
    sets: dict[str, list[int]] = {}
    if given:
        sets["given"] = list(given)
    for method in methods:
        if method == "attribution":
            sets[method] = top_latents(_need(run, method).delta_attribution, k)
        elif method == "activation":
            act = _need(run, method).delta_activation
            if act is None:
                raise LatentAuditError(f"{run.folder}: the run has no delta_activation (it was "
                                       "made with --no-delta-activation); drop 'activation' from "
                                       "--methods.")
            sets[method] = top_latents(act, k)
        elif method == "model-diff":
            if model_diff is None:
                raise LatentAuditError("--methods model-diff needs --base-model.")
            sets[method] = top_latents(model_diff, k)
    if "random" in methods:
        chosen = {i for ids in sets.values() for i in ids}
        sets["random"] = random_latents(d_sae, k, seed, chosen)
    return sets


def _need(run: RunInfo | None, method: str) -> RunInfo:
    if run is None:
        raise LatentAuditError(f"--methods {method} needs an attribution run: pass --from RUN_DIR.")
    return run


def used_prompt_ids(dataset: Path) -> set[str]:
    """Every prompt_id of a behaviour dataset (what attribution saw)."""
    from latentaudit.data.behaviour import load_behaviour

    return {c.prompt_id for c in load_behaviour(dataset)}
