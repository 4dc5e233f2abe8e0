"""Everything the monitor stages read besides completions, checked before a model loads:
an attribution run's rankings and identity, and the SAE.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit.attribution.plan import HOOK
from latentaudit.errors import LatentAuditError

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What the monitor takes from an attribution run folder (``latentaudit attribute --out``)."""

    path: Path
    model: str
    sae_path: str | None
    layer: int
    delta_attribution: Float[Tensor, " d_sae"]
    delta_activation: Float[Tensor, " d_sae"] | None
    dataset: Path | None
    """The behaviour dataset it was attributed on, when that file is still there."""

    def top(self, k: int, by: str = "attribution") -> list[int]:
        """The k latents with the largest Δ-attribution (or Δ-activation), best first."""
        values = self.delta_attribution if by == "attribution" else self.delta_activation
        if values is None:
            raise LatentAuditError(f"--run {self.path}: the run has no Δ-activation (it was "
                                   "made with --no-delta-activation); rerun it without.")
        return values.topk(min(k, values.numel())).indices.tolist()

    def prompts(self) -> set[str] | None:
        """prompt_ids of the attribution dataset (None when the file is gone)."""
        if self.dataset is None:
            return None
        from latentaudit.data.behaviour import load_behaviour

        return {c.prompt_id for c in load_behaviour(self.dataset)}


def read_run(path: str | Path, layer: int | None = None) -> Run:
    """Read ``manifest.json`` and ``attribution.safetensors`` of a run folder."""
    from safetensors import safe_open

    from latentaudit.attribution.output import MANIFEST_FILE, TENSORS_FILE, tensor_name

    path = Path(path)
    mpath, tpath = path / MANIFEST_FILE, path / TENSORS_FILE
    if not mpath.is_file() or not tpath.is_file():
        raise LatentAuditError(f"--run {path}: no {MANIFEST_FILE} and {TENSORS_FILE} there; "
                               "pass the --out folder of `latentaudit attribute`.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        layers = [int(x) for x in manifest["layers"]]
        model = str(manifest["model"]["name"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise LatentAuditError(f"{mpath}: not an attribution manifest ({err}).") from None
    if layer is None and len(layers) != 1:
        raise LatentAuditError(f"{mpath}: field 'layers' lists {layers}: pass --layer with the "
                               "one to use.")
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise LatentAuditError(f"--layer {layer}: the run {path} attributed layers {layers}.")
    several = len(layers) > 1
    with safe_open(str(tpath), framework="pt") as f:
        names = set(f.keys())
        attr_name = tensor_name("delta_attribution", layer, several)
        if attr_name not in names:
            raise LatentAuditError(f"{tpath}: tensor '{attr_name}' is missing; rerun attribute.")
        attr = f.get_tensor(attr_name).float()
        act_name = tensor_name("delta_activation", layer, several)
        act = f.get_tensor(act_name).float() if act_name in names else None
    sae_path = ((manifest.get("saes") or {}).get(str(layer)) or {}).get("path")
    return Run(path, model, sae_path, layer, attr, act, _dataset(path, manifest))


def _dataset(run: Path, manifest: dict) -> Path | None:
    """The run's dataset file: as recorded, or relative to the run's parent folder."""
    recorded = (manifest.get("dataset") or {}).get("path")
    if not recorded:
        return None
    for candidate in (Path(recorded), run.parent / recorded):
        if candidate.is_file():
            return candidate
    log.warning("the attribution dataset %s of %s is gone: cannot check that the monitor's "
                "completions come from other prompts", recorded, run)
    return None


def check_held_out(prompts: set[str] | None, used: list[str], flag: str, what: str) -> None:
    """Refuse completions of prompts the latents were found on (or the monitor fit on)."""
    if prompts is None:
        return
    shared = sorted(prompts & set(used))
    if shared:
        raise LatentAuditError(
            f"{flag}: {len(shared)} prompt(s) were also used {what} (e.g. {shared[0]!r}); "
            "detection must be measured on other prompts: pass completions of held-out prompts.")


def load_monitor_sae(value: str, model: str, layer: int | None):
    """Load an ``--sae`` value (a path, a shipped name or ``default``) in float32 on the CPU."""
    from latentaudit.saes import load_sae
    from latentaudit.saes.shipped import resolve_sae_path

    path = resolve_sae_path(value, model)
    if not Path(path).exists():
        raise LatentAuditError(f"--sae {value}: no such file or folder.")
    return load_sae(path, dtype="fp32", layer=layer, hook=HOOK)


def check_latents(latents: list[int], d_sae: int, flag: str = "--latents") -> torch.Tensor:
    bad = [i for i in latents if not 0 <= i < d_sae]
    if bad:
        raise LatentAuditError(f"{flag} {bad[0]}: the SAE has latents 0..{d_sae - 1}.")
    twice = [i for n, i in enumerate(latents) if i in latents[:n]]
    if twice:
        raise LatentAuditError(f"{flag}: latent {twice[0]} is listed twice.")
    return torch.tensor(latents, dtype=torch.long)


def resolve(run: Run | None, model: str | None, sae: str | None, layer: int | None):
    """(model name, SAE, layer): the flags, else what the run records; checked together."""
    model = model or (run.model if run else None)
    value = sae or (run.sae_path if run else None)
    if model is None or value is None:
        raise LatentAuditError("without --run, pass --model and --sae.")
    if layer is None and run is not None:
        layer = run.layer
    the_sae = load_monitor_sae(value, model, layer)
    layer = layer if layer is not None else the_sae.info.layer
    if layer is None:
        raise LatentAuditError(f"--sae {value} does not record its layer: pass --layer.")
    if run is not None and run.delta_attribution.numel() != the_sae.d_sae:
        raise LatentAuditError(f"--run {run.path} ranks {run.delta_attribution.numel()} latents "
                               f"but the SAE {value} has {the_sae.d_sae}: pass the run's SAE.")
    return model, the_sae, layer
