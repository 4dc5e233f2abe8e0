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

from pathlib import Path

import torch
from torch import Tensor

from latentaudit.attribution.select import random_latents, top_latents
from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError
from latentaudit.runfolder import RunFolder


def read_run(folder: str | Path) -> RunFolder:
    """The attribution run a sweep steers (one layer: a sweep steers one SAE)."""
    run = RunFolder.open(folder, "--from")
    if run.several:
        raise LatentAuditError(f"{run.path / 'manifest.json'}: field 'layers' lists "
                               f"{run.layers}; steering reads one layer, so attribute one layer "
                               "per run folder.")
    return run


def latent_sets(run: RunFolder | None, methods: tuple[str, ...], k: int, seed: int, d_sae: int,
                given: list[int] | None = None,
                model_diff: Tensor | None = None) -> dict[str, list[int]]:
    """The latents each selection method steers (see the module docstring)."""
    sets: dict[str, list[int]] = {}
    if given:
        sets["given"] = list(given)
    for method in methods:
        if method == "attribution":
            run = _need(run, method)
            sets[method] = top_latents(run.delta_attribution(run.layers[0]), k)
        elif method == "activation":
            run = _need(run, method)
            act = run.delta_activation(run.layers[0])
            if act is None:
                raise OptionError("methods", f"{run.path}: the run has no delta_activation (it "
                                             "was made with {not delta_activation}); drop "
                                             "'activation' from {}.")
            sets[method] = top_latents(act, k)
        elif method == "model-diff":
            if model_diff is None:
                raise OptionError("methods", "{} model-diff needs {base_model}.")
            sets[method] = top_latents(model_diff, k)
    if "random" in methods:
        chosen = {i for ids in sets.values() for i in ids}
        sets["random"] = random_latents(d_sae, k, chosen, torch.Generator().manual_seed(seed))
    return sets


def _need(run: RunFolder | None, method: str) -> RunFolder:
    if run is None:
        raise OptionError("methods", f"{{}} {method} needs an attribution run: pass --from "
                                     "RUN_DIR.")
    return run
