"""The monitor file: one safetensors file whose JSON header says what the monitor reads.

A monitor scores a completion by p = σ(w·x + b), x = the chosen reductions (``mean`` and / or
``max`` over the completion's tokens, see :mod:`~latentaudit.monitor.read`) of its latents,
block by block (all latents' means, then all their maxima); it flags the completion when
p ≥ ``threshold``. The weights act on raw activations (the fit's standardisation is folded in).

Tensors: ``latents`` int64 [k], ``weight`` float32 [d_in], ``bias`` float32 [1] (d_in = k × the
number of reductions). Metadata key ``latentaudit_monitor``: a JSON object with ``format``
("latentaudit-monitor"), ``schema_version``, ``latents``, ``reduce``, ``weights``, ``bias``,
``threshold``, ``model`` (name, d_model), ``sae`` (path, digest, d_sae, d_model), ``layer``,
``hook`` and ``fit`` (what it was fit on and how it did). The header's latents and weights must
equal the tensors; a file where they differ is refused.

The SAE's identity is a digest of its tensors in float32 (so a copy, a move or an fp16 ↔ fp32
conversion of the same weights keeps it); scoring with another SAE, layer or model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._io import load_tagged_safetensors
from latentaudit.errors import LatentAuditError

FORMAT = "latentaudit-monitor"
SCHEMA_VERSION = 1
REDUCES = ("mean", "max")
META_KEY = "latentaudit_monitor"


def sae_digest(sae) -> str:
    """sha256 (16 hex) of an SAE's tensors in float32 and its nonlinearity."""
    h = hashlib.sha256(json.dumps([sae.info.activation, sae.info.k, sae.info.subtract_b_dec,
                                   sae.info.input_norm]).encode())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        t = getattr(sae, name)
        if t is not None:
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Monitor:
    """A fitted latent monitor (see the module docstring)."""

    latents: list[int]
    reduce: list[str]
    weight: Float[Tensor, " d_in"]
    bias: float
    threshold: float
    """Flag when σ(w·x + b) ≥ threshold."""
    model: dict[str, Any]
    """``name`` and ``d_model`` of the model it reads."""
    sae: dict[str, Any]
    """``path``, ``digest``, ``d_sae`` and ``d_model`` of its SAE."""
    layer: int
    hook: str = "resid_post"
    fit: dict[str, Any] = field(default_factory=dict)

    def features(self, latent_mean: Float[Tensor, "batch k"],
                 latent_max: Float[Tensor, "batch k"]) -> Float[Tensor, "batch d_in"]:
        """x: the reductions of the monitor's latents, block by block."""
        blocks = {"mean": latent_mean, "max": latent_max}
        return torch.cat([blocks[r].float() for r in self.reduce], dim=1)

    def probability(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, " batch"]:
        return torch.sigmoid(x.float() @ self.weight.float() + self.bias)

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "latents": self.latents,
                "reduce": self.reduce, "weights": self.weight.float().tolist(),
                "bias": self.bias, "threshold": self.threshold, "model": self.model,
                "sae": self.sae, "layer": self.layer, "hook": self.hook, "fit": self.fit}

    def digest(self) -> str:
        """sha256 (12 hex) of what the monitor computes (latents, reductions, weights)."""
        blob = json.dumps([self.latents, self.reduce, self.weight.float().tolist(), self.bias,
                           self.threshold, self.sae.get("digest"), self.layer])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        from latentaudit._io import save_safetensors

        path = Path(path)
        save_safetensors(path, {"latents": torch.tensor(self.latents, dtype=torch.long),
                                "weight": self.weight.float(),
                                "bias": torch.tensor([self.bias], dtype=torch.float32)},
                         metadata={META_KEY: json.dumps(self.header(), ensure_ascii=False)})
        return path


def load_monitor(path: str | Path, flag: str = "--monitor") -> Monitor:
    """Read and check a monitor file."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"{flag} {path}: no such file; make one with "
                               "`latentaudit monitor fit`.")
    meta, tensors = load_tagged_safetensors(path, META_KEY, FORMAT, "monitor",
                                            "make one with `latentaudit monitor fit`",
                                            f"{flag} ")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise LatentAuditError(f"{path}: field 'schema_version' is {meta.get('schema_version')!r}"
                               f"; this latentaudit reads version {SCHEMA_VERSION}: refit it.")
    try:
        mon = Monitor(latents=[int(i) for i in meta["latents"]],
                      reduce=[str(r) for r in meta["reduce"]], weight=tensors["weight"].float(),
                      bias=float(meta["bias"]), threshold=float(meta["threshold"]),
                      model=dict(meta["model"]), sae=dict(meta["sae"]), layer=int(meta["layer"]),
                      hook=str(meta.get("hook", "resid_post")), fit=dict(meta.get("fit") or {}))
        header_latents, header_weights = tensors["latents"].tolist(), meta["weights"]
    except (KeyError, TypeError, ValueError) as err:
        raise LatentAuditError(f"{path}: the monitor is incomplete (field {err}); refit it.") \
            from err
    _check_consistent(path, mon, header_latents, header_weights)
    return mon


def _check_consistent(path: Path, mon: Monitor, latents: list[int], weights: Any) -> None:
    bad = [r for r in mon.reduce if r not in REDUCES]
    if bad or not mon.reduce or len(set(mon.reduce)) != len(mon.reduce):
        raise LatentAuditError(f"{path}: field 'reduce' must list some of {', '.join(REDUCES)} "
                               f"once each, got {mon.reduce}; refit it.")
    if latents != mon.latents:
        raise LatentAuditError(f"{path}: field 'latents' differs from the 'latents' tensor; the "
                               "file was edited by hand: refit it.")
    if mon.weight.shape != (len(mon.latents) * len(mon.reduce),) or not isinstance(
            weights, list) or len(weights) != mon.weight.numel() or not torch.allclose(
            torch.tensor(weights, dtype=torch.float32), mon.weight, rtol=1e-6, atol=0):
        raise LatentAuditError(f"{path}: field 'weights' does not match the 'weight' tensor "
                               f"({len(mon.latents)} latents × {len(mon.reduce)} reductions); "
                               "refit it.")
    if not 0 <= mon.threshold <= 1 or math.isnan(mon.threshold):
        raise LatentAuditError(f"{path}: field 'threshold' must be a probability, got "
                               f"{mon.threshold}.")


def check_identity(mon: Monitor, where: str, model: str | None = None, sae=None,
                   layer: int | None = None) -> None:
    """Refuse a monitor whose model, SAE or layer differs from what it is asked to read."""
    if model is not None:
        from latentaudit.models.embedded import canonical

        if canonical(model) != canonical(str(mon.model.get("name"))):
            raise LatentAuditError(
                f"{where} was fit on model '{mon.model.get('name')}' but --model is '{model}': "
                f"pass --model {mon.model.get('name')}, or fit a monitor for this model.")
    if layer is not None and layer != mon.layer:
        raise LatentAuditError(f"{where} reads layer {mon.layer} but --layer is {layer}: pass "
                               f"--layer {mon.layer}, or fit a monitor at layer {layer}.")
    if sae is not None:
        recorded = sae.info.layer
        if recorded is not None and recorded != mon.layer:
            raise LatentAuditError(
                f"{where} reads layer {mon.layer} but the SAE {sae.info.source_path} was "
                f"trained on layer {recorded}: pass the SAE the monitor was fit with "
                f"({mon.sae.get('path')}).")
        if sae.info.hook != mon.hook:
            raise LatentAuditError(
                f"{where} reads the hook point {mon.hook} (field 'hook') but the SAE "
                f"{sae.info.source_path} reads {sae.info.hook}: pass the SAE the monitor was "
                f"fit with ({mon.sae.get('path')}).")
        digest = sae_digest(sae)
        if digest != mon.sae.get("digest"):
            raise LatentAuditError(
                f"{where} was fit with the SAE {mon.sae.get('path')} (digest "
                f"{mon.sae.get('digest')}, d_sae {mon.sae.get('d_sae')}) but "
                f"{sae.info.source_path} is a different SAE (digest {digest}, d_sae "
                f"{sae.d_sae}): pass --sae {mon.sae.get('path')}, or fit a monitor for this SAE.")


def check_model_fits(mon: Monitor, where: str, d_model: int, name: str) -> None:
    """After loading: the model's width must be the one the monitor was fit on."""
    if d_model != mon.model.get("d_model"):
        raise LatentAuditError(f"{where} was fit on a model with d_model "
                               f"{mon.model.get('d_model')} but {name} has d_model {d_model}: "
                               "pass the model the monitor was fit on.")
