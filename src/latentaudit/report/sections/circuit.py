"""The circuit section: the graph of ``latentaudit circuit``, drawn as an inline SVG.

1. Read ``circuit.json`` from the circuit folder (default ``RUN/circuit``; without the file the
   section is left out) and check it: every edge names two of its nodes, every weight is a number.
2. Lay the graph out in columns, one per layer, the earliest on the left, each centred on the
   tallest: the targets in ranking order, each lower column by the mean row of the nodes it
   feeds (fewer crossings).
3. Each edge a curve whose width grows with |Δ-edge| and whose colour says its sign; each node a
   circle with its latent id and first logit-lens token, and a panel (logit lens, top-activating
   examples, its strongest edges in and out) that the page's script shows when the node is
   clicked (or named in the address, ``#cnode-LAYER-LATENT``). A slider hides weak edges.
4. Each target of the run's layer gets its upstream edges in its drill-down.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError
from latentaudit.report.highlight import BLUE, RED
from latentaudit.report.read import read_json_if
from latentaudit.report.sections.explain import examples

FIX = "rerun `latentaudit circuit` (or pass --circuit with its --out folder)."
COLUMN = 300
"""Horizontal distance between layer columns (px)."""
ROW = 38
"""Vertical distance between nodes of a column (px)."""
MARGIN = 60
RADIUS = (7.0, 15.0)
"""Smallest and largest node radius (∝ √|Δ-attribution| within the page)."""
WIDTH = (0.8, 9.0)
"""Thinnest and thickest edge (∝ |Δ-edge| / the largest)."""
SHOWN_EDGES = 8
LABEL_PX = 7
"""Width of a label character at the graph's 11 px font (px, generous)."""
MEANING = {
    "loss": "An edge is the first-order change of the target's contribution to the loss when the "
            "upstream latent is mean-ablated, as Δ over the run's pairs (δ's units): red edges "
            "carry support for the behaviour-showing completions, blue edges against it.",
    "pre-activation": "An edge is the first-order change of the target's pre-activation (summed "
                      "over the completion) when the upstream latent is mean-ablated, as Δ over "
                      "the run's pairs: red > 0 (removing the upstream latent raises the target), "
                      "blue < 0 (it drives the target).",
}


def load(folder: Path, run_layers: list[int] | None = None) -> dict[str, Any] | None:
    """The section's dict, or None when ``folder`` holds no circuit.json."""
    g = read_json_if(folder / "circuit.json", FIX)
    if g is None:
        return None
    nodes, edges = _check(folder / "circuit.json", g)
    layers = sorted({n["layer"] for n in nodes})
    place = layout(nodes, edges, layers)
    top_w = max((abs(e["weight"]) for e in edges), default=0.0)
    top_d = max((abs(n.get("delta_attribution") or 0.0) for n in nodes), default=0.0)
    views = {n["id"]: node_view(n, place[n["id"]], top_d, edges, nodes) for n in nodes}
    drawn = [edge_view(e, views, top_w) for e in edges]
    run_layers = run_layers or []
    return {"path": str(folder), "measure": g.get("measure"),
            "meaning": MEANING.get(g.get("measure"), ""), "hops": g.get("hops") or [],
            "counts": g.get("counts") or {}, "kept": kept_share(nodes, g.get("options") or {}),
            **extent(list(views.values())),
            "layer_columns": [{"x": MARGIN + COLUMN * c, "label": f"layer {L}"}
                        for c, L in enumerate(layers)],
            "nodes": list(views.values()), "edges": drawn,
            "latents": {(n["layer"], n["latent"]): {"incoming": views[n["id"]]["incoming"]}
                        for n in nodes if n["layer"] in run_layers and views[n["id"]]["incoming"]}}


def kept_share(nodes: list[dict], options: dict[str, Any]) -> str:
    """What share of their targets' total |Δ-edge| the kept edges hold, in words."""
    shares = [n["attribution_kept"] / n["attribution_total"] for n in nodes
              if isinstance(n.get("attribution_kept"), (int, float))
              and isinstance(n.get("attribution_total"), (int, float)) and n["attribution_total"]]
    if not shares:
        return ""
    span = f"{100 * min(shares):.1f}%" if max(shares) - min(shares) < 5e-4 else \
        f"{100 * min(shares):.1f}–{100 * max(shares):.1f}%"
    rule = ""
    if isinstance(options.get("fraction"), (int, float)):
        cap = options.get("max_edges")
        rule = (f" (each target keeps its strongest incoming edges until they hold "
                f"{100 * options['fraction']:.0f}% of its total"
                + (f" or number {cap}, whichever comes first" if cap else "") + ")")
    return (f"The kept edges hold {span} of their target's total |Δ-edge|{rule}: the rest is "
            "spread over many weak edges, so the graph shows the strongest paths, not all of "
            "the attribution.")


def _check(path: Path, g: Any) -> tuple[list[dict], list[dict]]:
    """Step 1: nodes with ``id``, ``layer``, ``latent``; edges between them with numeric weights."""
    if not isinstance(g, dict) or not isinstance(g.get("nodes"), list) or \
            not isinstance(g.get("edges"), list):
        raise LatentAuditError(f"{path}: fields 'nodes' and 'edges' must be lists; {FIX}")
    nodes = g["nodes"]
    for n, node in enumerate(nodes, start=1):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or \
                not all(isinstance(node.get(k), int) for k in ("layer", "latent")):
            raise LatentAuditError(f"{path}: node {n} needs a string 'id' and integer 'layer' "
                                   f"and 'latent'; {FIX}")
    ids = {node["id"] for node in nodes}
    for n, e in enumerate(g["edges"], start=1):
        if not isinstance(e, dict) or e.get("source") not in ids or e.get("target") not in ids:
            raise LatentAuditError(f"{path}: edge {n} does not join two of the file's nodes; "
                                   f"{FIX}")
        w = e.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise LatentAuditError(f"{path}: edge {n} has no finite 'weight'; {FIX}")
    return nodes, g["edges"]


def layout(nodes: list[dict], edges: list[dict], layers: list[int]
           ) -> dict[str, tuple[float, float]]:
    """Step 2: {node id: (x, y)}."""
    into: dict[str, list[str]] = {}
    for e in edges:
        into.setdefault(e["source"], []).append(e["target"])
    row: dict[str, float] = {}
    place = {}
    tallest = max((sum(n["layer"] == L for n in nodes) for L in layers), default=0)
    for c, L in reversed(list(enumerate(layers))):
        column = [n for n in nodes if n["layer"] == L]
        if c == len(layers) - 1:
            column.sort(key=lambda n: (n.get("rank") is None, n.get("rank") or 0, n["latent"]))
        else:
            def centre(n):
                fed = [row[t] for t in into.get(n["id"], []) if t in row]
                return (sum(fed) / len(fed) if fed else math.inf, n["latent"])
            column.sort(key=centre)
        top = (tallest - len(column)) / 2  # columns centred on the tallest
        for r, n in enumerate(column):
            row[n["id"]] = top + r
            place[n["id"]] = (MARGIN + COLUMN * c, MARGIN + ROW * (top + r))
    return place


def extent(views: list[dict[str, Any]]) -> dict[str, int]:
    """{width, height} of the drawing: its nodes and their labels, with a small margin (the box
    is as large as the graph, not a fixed frame)."""
    right = max((v["x"] + v["r"] + 4 + LABEL_PX * len(f"{v['latent']} {v['label']}")
                 for v in views), default=2 * MARGIN)
    bottom = max((v["y"] + v["r"] for v in views), default=2 * MARGIN)
    return {"width": math.ceil(right + 16), "height": math.ceil(bottom + 16)}


def node_view(n: dict, xy: tuple[float, float], top_d: float, edges: list[dict],
              nodes: list[dict]) -> dict[str, Any]:
    """Step 3 for one node."""
    lens = [str(t) for t in (n.get("logit_lens") or [])]
    d = n.get("delta_attribution")
    size = math.sqrt(abs(d) / top_d) if isinstance(d, (int, float)) and top_d > 0 else 0.0
    names = {m["id"]: m for m in nodes}

    def listed(rows: list[dict], other: str) -> list[dict]:
        rows = sorted(rows, key=lambda e: -abs(e["weight"]))[:SHOWN_EDGES]
        return [{"node": e[other], "dom": dom_id(e[other]), "weight": e["weight"],
                 "share": e.get("share"),
                 "lens": [str(t) for t in (names[e[other]].get("logit_lens") or [])[:4]]}
                for e in rows]

    return {"id": n["id"], "dom": dom_id(n["id"]), "layer": n["layer"], "latent": n["latent"],
            "role": n.get("role"), "rank": n.get("rank"), "delta": d,
            "x": xy[0], "y": xy[1], "r": round(RADIUS[0] + (RADIUS[1] - RADIUS[0]) * size, 1),
            "color": _rgb(RED if (d or 0) >= 0 else BLUE), "label": lens[0] if lens else "",
            "lens": lens, "kept": n.get("attribution_kept"), "total": n.get("attribution_total"),
            "examples": examples(n.get("top_examples") or []),
            "incoming": listed([e for e in edges if e["target"] == n["id"]], "source"),
            "outgoing": listed([e for e in edges if e["source"] == n["id"]], "target")}


def edge_view(e: dict, views: dict[str, dict], top_w: float) -> dict[str, Any]:
    """Step 3 for one edge: a cubic curve from the source's right to the target's left."""
    s, t = views[e["source"]], views[e["target"]]
    x1, y1, x2, y2 = s["x"] + s["r"], s["y"], t["x"] - t["r"], t["y"]
    mid = (x1 + x2) / 2
    rel = abs(e["weight"]) / top_w if top_w > 0 else 0.0
    return {"path": f"M{x1:.1f} {y1:.1f} C{mid:.1f} {y1:.1f} {mid:.1f} {y2:.1f} {x2:.1f} {y2:.1f}",
            "width": round(WIDTH[0] + (WIDTH[1] - WIDTH[0]) * rel, 2),
            "color": _rgb(RED if e["weight"] > 0 else BLUE), "source": s["dom"],
            "target": t["dom"], "strength": round(100 * rel, 1), "weight": e["weight"],
            "share": e.get("share"), "from": e["source"], "to": e["target"]}


def dom_id(node: str) -> str:
    """The element id of a node: ``cnode-LAYER-LATENT``."""
    return "cnode-" + node.replace(":", "-")


def _rgb(c: tuple[int, int, int]) -> str:
    return f"rgb({c[0]},{c[1]},{c[2]})"
