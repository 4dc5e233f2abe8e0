"""The circuit driver: check inputs → load the model → one pass per hop, down the chain → write.

Everything that can be checked without the model (the run folder, the targets, every SAE and its
layer, the dataset, the options, the reference text when examples must be computed) is checked
before it loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from latentaudit.attribution.finish import choose_abar
from latentaudit.attribution.math import center, deltas_from_moments
from latentaudit.attribution.plan import Inputs as PlanInputs
from latentaudit.attribution.plan import make_plan
from latentaudit.circuit import labels
from latentaudit.circuit.config import CircuitConfig, CircuitResult, Hop
from latentaudit.circuit.inputs import Inputs, Upstream, check_inputs
from latentaudit.circuit.math import (
    center_stacked,
    edges_from_moments,
    loss_cotangents,
    next_targets,
    preactivation_cotangents,
    prune_edges,
)
from latentaudit.circuit.output import (
    graph,
    graph_nodes,
    hop_name,
    label,
    tensors,
    write_circuit,
)
from latentaudit.circuit.passes import hop_key, run_hop
from latentaudit.errors import LatentAuditError
from latentaudit.explain.examples import sae_fingerprint
from latentaudit.models import load as model_load
from latentaudit.models.hooks import layer_module
from latentaudit.models.load import LoadedModel
from latentaudit.saes.sae import SAE


def trace_circuit(run: str | os.PathLike, upstream: Upstream, cfg: CircuitConfig | None = None, *,
                  upstream_layers: int | Sequence[int] | None = None, layer: int | None = None,
                  targets: Sequence[int] | None = None, model: LoadedModel | str | None = None,
                  sae: SAE | str | os.PathLike | None = None,
                  data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None, device: str = "auto",
                  dtype: str = "float32") -> CircuitResult:
    """Attribute the top latents of an attribution run to the latents of earlier layers and write
    ``<run>/circuit/`` (or ``out``); see :mod:`latentaudit.circuit` for the files.

    upstream: the SAE of an earlier layer (or its path), several for a chain (each at the layer it
    records, or at ``upstream_layers``), or {layer: SAE}. targets: latent ids at ``layer`` (the
    run's layer; needed when the run has several); default the top ``cfg.top_k`` of its ranking.
    model: a :class:`~latentaudit.models.load.LoadedModel` or a name (default: the run's), loaded
    on ``device`` in ``dtype`` after every other input checked out. sae / data replace the run's
    SAE and dataset when they have moved. cache_dir: explain's example cache (default
    ``$LATENTAUDIT_CACHE``, else ``~/.cache/latentaudit``).
    """
    cfg = cfg or CircuitConfig()
    if not isinstance(model, LoadedModel):
        model_load.parse_dtype(dtype)
        model_load.resolve_device(device)
    name = model.name if isinstance(model, LoadedModel) else model
    inputs = check_inputs(run, upstream, upstream_layers, cfg, layer=layer, targets=targets,
                          sae=sae, data=data, model_name=name)
    out = Path(out) if out else inputs.run.path / "circuit"
    if out.exists() and not out.is_dir():
        raise LatentAuditError(f"--out {out} is a file: pass a folder for the circuit's files.")
    if cfg.examples:
        _check_corpus(inputs, model, dtype, cache_dir)
    if not isinstance(model, LoadedModel):
        model = model_load.load_model(inputs.model_name, device=device, dtype=dtype)
    saes = {inputs.layer: inputs.target_sae, **inputs.upstream}
    for L, s in saes.items():
        s.to(model.device)
        s.check_fits(model.d_model, model_name=model.name)
        layer_module(model.model, L)  # a clear error for a layer the model lacks
    max_len = getattr(model.model.config, "max_position_embeddings", None)
    plan = make_plan(PlanInputs(inputs.data, inputs.pairing, {}, inputs.dataset),
                     model.tokenizer, max_len, cfg.batch_size)
    hops = _hops(model, inputs, plan, cfg, out)
    result = _assemble(model, inputs, cfg, hops, out, cache_dir)
    write_circuit(result)
    for hop in hops:
        (out / f"{hop_name(hop)}.checkpoint.safetensors").unlink(missing_ok=True)
    return result


def _hops(model: LoadedModel, inputs: Inputs, plan, cfg: CircuitConfig, out: Path) -> list[Hop]:
    """One hop per upstream SAE, from the run's layer down; a hop's targets are the upstream
    latents the hop above kept most of."""
    hops: list[Hop] = []
    upper, upper_sae, targets = inputs.layer, inputs.target_sae, inputs.targets
    for lower, sae in inputs.upstream.items():
        if not targets:
            break
        hops.append(one_hop(model, plan, lower, sae, upper, upper_sae, targets, cfg,
                            inputs.positions, out))
        upper, upper_sae = lower, sae
        targets = next_targets(hops[-1].edges, hops[-1].keep, cfg.top_k)
    return hops


def one_hop(model: LoadedModel, plan, lower: int, sae: SAE, upper: int, upper_sae: SAE,
            targets: list[int], cfg: CircuitConfig, positions: str, out: Path | None) -> Hop:
    """The Δ-edges from every latent of ``sae`` (layer ``lower``) into ``targets`` of
    ``upper_sae`` (layer ``upper``), pruned."""
    if cfg.measure == "loss":
        dirs = upper_sae.decoder_directions()[targets].to(model.device)  # (K, D)
        cotangents = partial(_loss_cotangents, dirs, positions)
    else:
        cotangents = partial(_pre_cotangents, upper_sae)
    points = (sae.info.hook, upper_sae.info.hook)
    key = hop_key(model.name, f"{sae_fingerprint(sae)}:{sae_fingerprint(upper_sae)}", lower,
                  upper, targets, plan, cfg, positions, points)
    checkpoint = out / f"L{lower}_L{upper}.checkpoint.safetensors" if out else None
    sums, route = run_hop(model, plan, lower, upper, targets, sae.d_sae, cotangents, cfg,
                          positions, key, checkpoint, points)
    a_bar, source = choose_abar(cfg.abar, sae, sums.node)
    dirs_up = sae.decoder_directions().to(sums.M_raw.device)  # (S, D)
    edges = edges_from_moments(center_stacked(sums.M_raw, sums.u_sum, a_bar), dirs_up).cpu()
    node_delta = deltas_from_moments(center(sums.node.M_raw, sums.node.g_sum, a_bar), dirs_up)
    pruned = prune_edges(edges, cfg.fraction, cfg.max_edges)
    return Hop(upstream_layer=lower, target_layer=upper, targets=list(targets), edges=edges,
               keep=pruned.keep, total=pruned.total.tolist(), kept=pruned.kept.tolist(),
               upstream_delta=node_delta.cpu(), a_bar=a_bar.float().cpu(), abar_source=source,
               route=route, upstream_sae=sae.info.source_path or "", upstream_hook=points[0],
               target_hook=points[1])


def _loss_cotangents(directions, positions: str, a2, g2, batch, targets):
    mask = batch.attention_mask.bool() if positions == "all" else batch.completion_mask
    return loss_cotangents(g2, directions, mask)


def _pre_cotangents(sae: SAE, a2, g2, batch, targets):
    return preactivation_cotangents(sae, a2, targets, batch.completion_mask)


def _assemble(model: LoadedModel, inputs: Inputs, cfg: CircuitConfig, hops: list[Hop], out: Path,
              cache_dir) -> CircuitResult:
    """The graph with its labels, and the arrays."""
    run = inputs.run
    ranks = {r["latent"]: r["rank"] for r in run.ranked(inputs.layer)}
    nodes = graph_nodes(hops, run.delta_attribution(inputs.layer), ranks) if hops else []
    saes = {inputs.layer: inputs.target_sae, **inputs.upstream}
    by_layer: dict[int, list[int]] = {}
    for node in nodes:
        by_layer.setdefault(node["layer"], []).append(node["latent"])
    lens, examples = {}, {}
    for L, latents in by_layer.items():
        for i, toks in labels.lens_tokens(model, saes[L], latents, cfg.lens_tokens).items():
            lens[(L, i)] = toks
        rows = labels.node_examples(model, saes[L], L, latents, inputs.explain_cfg,
                                    inputs.model_name, cfg.examples, cfg.node_examples, cache_dir)
        for i in latents:
            examples[(L, i)] = None if rows is None else rows[i]
    label(nodes, lens, examples)
    pairs = inputs.pairing.pairs
    counts = {"completions": len(inputs.pairing.used), "pairs": len(pairs),
              "prompts": len({inputs.data[i].prompt_id for p in pairs for i in p})}
    content = graph(hops, nodes, cfg, run=str(run.path), model=inputs.model_name,
                    positions=inputs.positions, dataset=inputs.dataset, counts=counts)
    return CircuitResult(hops=hops, graph=content, out=out, tensors=tensors(hops))


def _check_corpus(inputs: Inputs, model, dtype: str, cache_dir) -> None:
    """With ``examples``, a reference text that is missing fails before the model loads."""
    dtype_name = labels.dtype_name(model) if isinstance(model, LoadedModel) else \
        str(model_load.parse_dtype(dtype)).replace("torch.", "")
    saes = {inputs.layer: inputs.target_sae, **inputs.upstream}
    keys = [labels.examples_key(s, inputs.model_name, dtype_name, L, inputs.explain_cfg)
            for L, s in saes.items()]
    from latentaudit.explain import examples as ex

    if not all(ex.is_cached(k, cache_dir) for k in keys):
        from latentaudit.saes.evaluate import text_documents

        text_documents(inputs.explain_cfg.corpus)
