"""Assemble the graph of a circuit and write its files (formats: :mod:`latentaudit.circuit`)."""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentaudit._io import save_safetensors, write_json
from latentaudit.circuit.config import CircuitConfig, CircuitResult, Hop

SCHEMA_VERSION = 1
GRAPH_FILE = "circuit.json"
TENSORS_FILE = "circuit.safetensors"
EXAMPLE_FIELDS = ("activation", "max_index", "tokens", "activations")


def node_id(layer: int, latent: int) -> str:
    return f"{layer}:{latent}"


def hop_name(hop: Hop) -> str:
    return f"L{hop.upstream_layer}_L{hop.target_layer}"


def graph_nodes(hops: list[Hop], run_delta: Tensor, ranks: dict[int, int]) -> list[dict[str, Any]]:
    """One node per target of the first hop and per upstream latent with a kept edge, layer by
    layer from the run's layer down, each with its Δ-attribution and incoming totals."""
    nodes: dict[tuple[int, int], dict[str, Any]] = {}
    top = hops[0].target_layer
    for i in hops[0].targets:
        nodes[(top, i)] = {"id": node_id(top, i), "layer": top, "latent": i, "rank": ranks.get(i),
                           "delta_attribution": float(run_delta[i])}
    for hop in hops:
        for row, i in enumerate(hop.targets):
            node = nodes.get((hop.target_layer, i))
            if node is not None:
                node["attribution_total"] = hop.total[row]
                node["attribution_kept"] = hop.kept[row]
        for j in sorted(set(hop.keep.nonzero()[:, 1].tolist())):
            nodes.setdefault((hop.upstream_layer, j), {
                "id": node_id(hop.upstream_layer, j), "layer": hop.upstream_layer, "latent": j,
                "rank": None, "delta_attribution": float(hop.upstream_delta[j])})
    bottom = hops[-1].upstream_layer
    for node in nodes.values():
        node["role"] = "target" if node["layer"] == top else \
            "upstream" if node["layer"] == bottom else "intermediate"
        node.setdefault("attribution_total", None)
        node.setdefault("attribution_kept", None)
    return list(nodes.values())


def graph_edges(hops: list[Hop]) -> list[dict[str, Any]]:
    """Every kept edge, strongest first within each target."""
    edges = []
    for hop in hops:
        for row, i in enumerate(hop.targets):
            js = hop.keep[row].nonzero().squeeze(1).tolist()
            js.sort(key=lambda j, row=row: -abs(float(hop.edges[row, j])))
            for j in js:
                w = float(hop.edges[row, j])
                edges.append({"source": node_id(hop.upstream_layer, j),
                              "target": node_id(hop.target_layer, i), "weight": w,
                              "share": abs(w) / hop.total[row] if hop.total[row] else None})
    return edges


def hop_rows(hops: list[Hop]) -> list[dict[str, Any]]:
    return [{"upstream_layer": h.upstream_layer, "target_layer": h.target_layer,
             "upstream_sae": h.upstream_sae, **_points(h), "targets": h.targets,
             "route": h.route, "abar_source": h.abar_source, "edges_kept": int(h.keep.sum()),
             "kept_share": [k / t if t else None for k, t in zip(h.kept, h.total, strict=True)]}
            for h in hops]


def _points(hop: Hop) -> dict[str, str]:
    """The hop's hook points, named where either is not resid_post (the default)."""
    if (hop.upstream_hook, hop.target_hook) == ("resid_post", "resid_post"):
        return {}
    return {"upstream_hook": hop.upstream_hook, "target_hook": hop.target_hook}


def label(nodes: list[dict[str, Any]], lens: dict[tuple[int, int], list[str]],
          examples: dict[tuple[int, int], list[dict] | None]) -> None:
    """Put each node's logit-lens tokens and top-activating examples (None: not cached)."""
    for node in nodes:
        key = (node["layer"], node["latent"])
        node["logit_lens"] = lens.get(key, [])
        rows = examples.get(key)
        node["top_examples"] = None if rows is None else \
            [{f: r[f] for f in EXAMPLE_FIELDS} for r in rows]


def graph(hops: list[Hop], nodes: list[dict], cfg: CircuitConfig, *, run: str, model: str,
          positions: str, dataset: dict | None, counts: dict[str, int]) -> dict[str, Any]:
    """The content of circuit.json."""
    return {"schema_version": SCHEMA_VERSION, "stage": "circuit", "run": run, "model": model,
            "measure": cfg.measure, "positions": positions,
            "layers": sorted({h.target_layer for h in hops} | {h.upstream_layer for h in hops}),
            "hops": hop_rows(hops), "nodes": nodes, "edges": graph_edges(hops),
            "dataset": dataset, "counts": counts, "options": asdict(cfg),
            "versions": _versions()}


def tensors(hops: list[Hop]) -> dict[str, Tensor]:
    """The arrays of circuit.safetensors."""
    out = {}
    for h in hops:
        name = hop_name(h)
        out[f"edges_{name}"] = h.edges.float()
        out[f"targets_{name}"] = torch.tensor(h.targets, dtype=torch.long)
        out[f"upstream_delta_{name}"] = h.upstream_delta.float()
        out[f"a_bar_{name}"] = h.a_bar.float()
    return out


def write_circuit(result: CircuitResult) -> None:
    """Write circuit.safetensors and circuit.json into ``result.out``, each atomically (the JSON
    last: its presence means the circuit is complete)."""
    out = Path(result.out)
    save_safetensors(out / TENSORS_FILE, result.tensors,
                     metadata={"schema_version": str(SCHEMA_VERSION)})
    write_json(out / GRAPH_FILE, result.graph)


def _versions() -> dict[str, str]:
    import transformers

    from latentaudit import __version__

    return {"latentaudit": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
