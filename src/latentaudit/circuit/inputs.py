"""Check every input of the circuit stage before the model loads (step 1 of the package docstring).

The run folder and its target layer, the targets, the run's SAE and dataset, the upstream SAEs
and their layers (each below the one above it, one d_model), the options, the output folder and,
with ``examples``, the reference text: each problem is one error naming its file, field or flag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from latentaudit.attribution.plan import config_file, saes_by_layer
from latentaudit.circuit.config import CircuitConfig
from latentaudit.errors import LatentAuditError
from latentaudit.explain.config import ExplainConfig
from latentaudit.explain.run import RunFolder, choose_latents, read_run
from latentaudit.options import Naming, flag
from latentaudit.saes.sae import SAE

log = logging.getLogger(__name__)

SAESource = SAE | str | os.PathLike
Upstream = SAESource | Sequence[SAESource] | Mapping[int, SAESource]
"""One upstream SAE, several (each at the layer it records, or at ``upstream_layers``), or
{layer: SAE}."""


@dataclass
class Inputs:
    """Everything the circuit stage needs that does not depend on the model."""

    run: RunFolder
    layer: int
    """The target layer (a layer of the run)."""
    targets: list[int]
    """Target latents at ``layer``, in ranking order (or as given)."""
    given: bool
    target_sae: SAE
    upstream: dict[int, SAE]
    """Upstream SAEs by layer, highest first: the order of the hops down the chain."""
    data: list
    pairing: Any
    dataset: dict[str, str] | None
    positions: str
    model_name: str
    explain_cfg: ExplainConfig
    """The options of the examples pass whose cache node examples are read from: the run's
    explain options when it has them."""


def check_inputs(run: str | os.PathLike, upstream: Upstream,
                 upstream_layers: int | Sequence[int] | None, cfg: CircuitConfig, *,
                 layer: int | None = None, targets: Sequence[int] | None = None,
                 sae: SAESource | None = None, data: str | os.PathLike | None = None,
                 model_name: str | None = None) -> Inputs:
    """Read the run and every input of the stage, with one clear error for any problem."""
    from latentaudit.explain.engine import _load_sae
    from latentaudit.models.embedded import canonical

    folder = read_run(run)
    chosen = choose_latents(folder, cfg.top_k, targets, layer, "targets")
    if len(chosen) > 1:
        raise LatentAuditError(f"the run {folder.path} has layers "
                               f"{', '.join(map(str, chosen))}: pass --layer with the layer of "
                               "the targets.")
    (target_layer, ids), = chosen.items()
    if sae is not None and not isinstance(sae, SAE):
        sae = str(sae)
    target_sae = _load_sae(folder, target_layer, sae)
    ups = upstream_saes(upstream, upstream_layers, target_layer, target_sae)
    rows, pairing, dataset = folder.pairs(data, "pass --data.", "the circuit")
    pairing = first_prompts(rows, pairing, cfg.max_prompts)
    name = canonical(model_name or folder.model_name)
    return Inputs(folder, target_layer, ids, targets is not None, target_sae, ups, rows,
                  pairing, dataset, folder.option.get("positions", "all"), name,
                  explain_config(folder))


def upstream_saes(upstream: Upstream, layers: int | Sequence[int] | None, target_layer: int,
                  target_sae: SAE, *, name: Naming = flag) -> dict[int, SAE]:
    """{layer: SAE}, highest layer first, each below the target layer and fitting its d_model
    (at any hook point attribution reads: :data:`~latentaudit.attribution.plan.POINTS`).

    Errors call the options ``upstream_sae`` and ``upstream_layer`` by ``name(field)``."""
    from latentaudit.attribution.plan import _load

    if isinstance(upstream, Mapping):
        if layers is not None:
            raise LatentAuditError("Pass either {layer: SAE} or upstream layers, not both.")
        layers = list(upstream)
        upstream = list(upstream.values())
    elif isinstance(upstream, (SAE, str, os.PathLike)):
        upstream = [upstream]
    if not upstream:
        raise LatentAuditError(f"{name('upstream_sae')} is missing: give the SAE of an earlier "
                               "layer.")
    by_layer = saes_by_layer([_load(s) for s in upstream], layers,
                             fields=("upstream_layer", "upstream_sae"), name=name)
    for L, s in by_layer.items():
        if L >= target_layer:
            raise LatentAuditError(
                f"{name('upstream_layer')} {L} ({config_file(s)}) is not below the targets' layer "
                f"{target_layer}: give SAEs of earlier layers.")
        if s.d_model != target_sae.d_model:
            raise LatentAuditError(
                f"{config_file(s)} has d_model={s.d_model} but the run's SAE has "
                f"d_model={target_sae.d_model}: give an SAE of the run's model.")
    return dict(sorted(by_layer.items(), reverse=True))


def first_prompts(rows, pairing, n: int):
    """``pairing`` with only the pairs of the first ``n`` paired prompts in the file's order
    (all of them when ``n`` is 0); the weights follow from the pairs kept."""
    if not n:
        return pairing
    paired = {rows[i].prompt_id for pair in pairing.pairs for i in pair}
    keep = set(list(dict.fromkeys(r.prompt_id for r in rows if r.prompt_id in paired))[:n])
    return replace(pairing, pairs=[p for p in pairing.pairs if rows[p[0]].prompt_id in keep])


def explain_config(run: RunFolder) -> ExplainConfig:
    """The explain options the run's ``explain/manifest.json`` records (defaults otherwise), so
    node examples come from the same cached pass."""
    import json

    path = run.path / "explain" / "manifest.json"
    options: dict[str, Any] = {}
    if path.is_file():
        try:
            options = json.loads(path.read_text(encoding="utf-8")).get("options") or {}
        except (json.JSONDecodeError, AttributeError):
            options = {}
    known = {f.name for f in fields(ExplainConfig)}
    try:
        return ExplainConfig(**{k: v for k, v in options.items() if k in known})
    except (LatentAuditError, TypeError):
        return ExplainConfig()
