"""Everything the monitor stages read besides completions, checked before a model loads:
an attribution run's rankings and identity, and the SAE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit.attribution.plan import POINTS
from latentaudit.attribution.select import top_latents
from latentaudit.errors import LatentAuditError
from latentaudit.runfolder import RunFolder

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One layer of an attribution run folder (``latentaudit attribute --out``), as the monitor
    reads it."""

    folder: RunFolder
    layer: int

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def model(self) -> str:
        return self.folder.model_name

    @property
    def sae_path(self) -> str | None:
        return self.folder.sae_path(self.layer)

    @property
    def delta_attribution(self) -> Float[Tensor, " d_sae"]:
        return self.folder.delta_attribution(self.layer)

    @property
    def delta_activation(self) -> Float[Tensor, " d_sae"] | None:
        return self.folder.delta_activation(self.layer)

    def top(self, k: int, by: str = "attribution") -> list[int]:
        """The k latents with the largest Δ-attribution (or Δ-activation), best first."""
        values = self.delta_attribution if by == "attribution" else self.delta_activation
        if values is None:
            raise LatentAuditError(f"--run {self.path}: the run has no Δ-activation (it was "
                                   "made with --no-delta-activation); rerun it without.")
        return top_latents(values, k)

    def prompts(self) -> set[str] | None:
        """prompt_ids of the attribution dataset (None when the file is gone)."""
        ids = self.folder.prompt_ids()
        if ids is None and self.folder.dataset_path:
            log.warning("the attribution dataset %s of %s is gone: cannot check that the "
                        "monitor's completions come from other prompts",
                        self.folder.dataset_path, self.path)
        return ids


def read_run(path: str | Path, layer: int | None = None) -> Run:
    """Read the run folder at ``path`` and choose its layer (``layer``, or its only one)."""
    folder = RunFolder.open(path, "--run", ranking=False)
    return Run(folder, folder.one_layer(layer))


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
    """Load an ``--sae`` value (a path, a shipped name or ``default``) in float32 on the CPU; it
    must read one of the hook points the monitor reads (:data:`POINTS`)."""
    from latentaudit.saes import load_sae
    from latentaudit.saes.shipped import resolve_sae_path

    path = resolve_sae_path(value, model)
    if not Path(path).exists():
        raise LatentAuditError(f"--sae {value}: no such file or folder.")
    sae = load_sae(path, dtype="fp32", layer=layer)
    if sae.info.hook not in POINTS:
        raise LatentAuditError(
            f"--sae {value} reads the hook point {sae.info.hook}, which the monitor does not "
            f"read: use an SAE trained at one of {', '.join(POINTS)}.")
    return sae


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
