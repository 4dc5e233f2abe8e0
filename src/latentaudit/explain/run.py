"""Read an attribution run folder (``latentaudit attribute --out``) and choose its latents.

The folder holds ``manifest.json`` (model, SAEs per layer, dataset path and sha256, options),
``ranking.jsonl`` and ``attribution.safetensors`` (see :mod:`latentaudit.attribution.output`).
Every problem names the file and the field, before any model loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from latentaudit.attribution.output import MANIFEST_FILE, RANKING_FILE, TENSORS_FILE
from latentaudit.errors import LatentAuditError


@dataclass
class RunFolder:
    """The files of one attribution run."""

    path: Path
    manifest: dict[str, Any]
    ranking: list[dict[str, Any]]
    tensors: dict[str, Tensor]
    layers: list[int]

    def tensor(self, name: str, layer: int) -> Tensor | None:
        """``name`` at ``layer`` (the file suffixes names with ``_layer{L}`` for several)."""
        key = f"{name}_layer{layer}" if len(self.layers) > 1 else name
        return self.tensors.get(key)

    def delta_attribution(self, layer: int) -> Tensor:
        t = self.tensor("delta_attribution", layer)
        if t is None:
            raise LatentAuditError(f"{self.path / TENSORS_FILE} has no delta_attribution for "
                                   f"layer {layer}: rerun `latentaudit attribute`.")
        return t

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    def sae_path(self, layer: int) -> str:
        return self.manifest["saes"][str(layer)]["path"]

    @property
    def dataset_path(self) -> str | None:
        return (self.manifest.get("dataset") or {}).get("path")

    @property
    def option(self) -> dict[str, Any]:
        return self.manifest.get("options") or {}

    def ranked(self, layer: int) -> list[dict[str, Any]]:
        """The ranking rows of ``layer``, best first."""
        return sorted((r for r in self.ranking if r.get("layer") == layer),
                      key=lambda r: r["rank"])


def read_run(path: str | os.PathLike) -> RunFolder:
    """Read and check a run folder."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise LatentAuditError(f"--from {folder}: no such run folder; pass the --out folder of "
                               "`latentaudit attribute`.")
    for name in (MANIFEST_FILE, RANKING_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise LatentAuditError(f"{folder} has no {name}: pass the --out folder of a finished "
                                   "`latentaudit attribute` run.")
    manifest = _json(folder / MANIFEST_FILE)
    for field in ("model", "saes", "layers"):
        if field not in manifest:
            raise LatentAuditError(f"{folder / MANIFEST_FILE}: field '{field}' is missing; "
                                   "rerun `latentaudit attribute`.")
    layers = [int(L) for L in manifest["layers"]]
    ranking = []
    with open(folder / RANKING_FILE, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                int(row["layer"]), int(row["latent"]), int(row["rank"])
            except (ValueError, KeyError, TypeError):
                raise LatentAuditError(f"{folder / RANKING_FILE}:{n}: not a ranking row with "
                                       "'layer', 'latent' and 'rank'.") from None
            ranking.append(row)
    return RunFolder(folder, manifest, ranking, load_file(folder / TENSORS_FILE), layers)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}.") from None


def parse_latents(text: str) -> list[int]:
    """``"12,87"`` -> [12, 87], with an error that names --latents."""
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise LatentAuditError(f"--latents {text!r}: give latent ids separated by commas, e.g. "
                               "--latents 12,87.") from None
    if not ids:
        raise LatentAuditError("--latents is empty: give latent ids, e.g. --latents 12,87.")
    return ids


def choose_latents(run: RunFolder, top_k: int, latents: Sequence[int] | None = None,
                   layer: int | None = None) -> dict[int, list[int]]:
    """{layer: latent ids}: the given ones (at ``layer``, needed when the run has several), else
    the top ``top_k`` of each layer's ranking."""
    if layer is not None and layer not in run.layers:
        raise LatentAuditError(f"--layer {layer} is not a layer of the run {run.path} (layers: "
                               f"{', '.join(map(str, run.layers))}).")
    if latents is None:
        chosen = {L: [r["latent"] for r in run.ranked(L)][:top_k]
                  for L in run.layers if layer in (None, L)}
        if not any(chosen.values()):
            raise LatentAuditError(f"{run.path / RANKING_FILE} holds no latents to explain.")
        return chosen
    if layer is None:
        if len(run.layers) > 1:
            raise LatentAuditError(f"the run {run.path} has layers "
                                   f"{', '.join(map(str, run.layers))}: pass --layer with "
                                   "--latents.")
        layer = run.layers[0]
    d_sae = run.delta_attribution(layer).numel()
    bad = [i for i in latents if not 0 <= i < d_sae]
    if bad:
        raise LatentAuditError(f"--latents {', '.join(map(str, bad))}: out of range, the SAE of "
                               f"layer {layer} has latents 0..{d_sae - 1}.")
    return {layer: list(dict.fromkeys(latents))}
