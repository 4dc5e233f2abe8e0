"""Gather every section of a run into the plain dict the templates show.

1. Each section of :data:`~latentaudit.report.sections.SECTIONS` loads its files (attribution
   first: it is required and says the run's layers); a section without files is None.
2. The latents of the page: the ranking (layer by layer, best first), then latents only other
   sections name (explained by id, steered at random), by layer and id.
3. The ranked-latents table: every section's columns, one row per latent, each cell with the
   value it sorts by; a column no latent has a value in (e.g. "steer toward" in a sweep that
   only steered away) is left out.
4. One drill-down per latent, with the parts of every section that has something on it. Its
   element id is ``latent-{id}`` (``latent-{layer}-{id}`` when the page holds several layers).
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from typing import Any

from latentaudit.report.sections import SECTIONS, Sources
from latentaudit.report.sections import attribution as attribution_section


def build_context(sources: Sources) -> dict[str, Any]:
    """The template context of one run (steps 1–4)."""
    from latentaudit import __version__

    ctx: dict[str, Any] = {"sections": []}
    for section in SECTIONS:
        data = section.load(sources)
        ctx[section.name] = data
        if section.name == "attribution":
            ranked = frozenset((r["layer"], r["latent"]) for r in data["ranking"])
            sources = dataclasses.replace(sources, run_layers=data["layers"],
                                          run_latents=ranked)
        if data is not None:
            ctx["sections"].append({"name": section.name, "title": section.title,
                                    "template": section.template,
                                    "latent_template": section.latent_template, "data": data,
                                    "lead": section.lead})
    ctx["sections"].sort(key=lambda s: not s["lead"])
    keys = latent_keys(ctx)
    attribution_section.complete(ctx["attribution"], keys)
    several = len({L for L, _ in keys}) > 1
    ids = {k: f"latent-{k[0]}-{k[1]}" if several else f"latent-{k[1]}" for k in keys}
    ctx["table"] = table(ctx, keys, ids)
    ctx["latents"] = drilldowns(ctx, keys, ids)
    model = attribution_section.model_title(ctx["attribution"]["model"])
    ctx["title"] = f"latentaudit report: {model}"
    ctx["generated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ctx["version"] = __version__
    return ctx


def _present(ctx: dict[str, Any]) -> list[tuple[dict, dict]]:
    """(section entry, section dict) of the sections the run has, in page order."""
    return [(s, s["data"]) for s in ctx["sections"]]


def latent_keys(ctx: dict[str, Any]) -> list[tuple[int, int]]:
    """Step 2: (layer, latent) of every latent on the page, in page order."""
    keys = [(r["layer"], r["latent"]) for r in ctx["attribution"]["ranking"]]
    seen = set(keys)
    extra = {k for _, data in _present(ctx) for k in data.get("latents", {}) if k not in seen}
    return keys + sorted(extra)


def table(ctx: dict[str, Any], keys: list[tuple[int, int]], ids: dict) -> dict[str, Any]:
    """Step 3: {columns, rows}; a row is {key, id, cells: [{kind, value, sort}], neuronpedia}
    (the latent's Neuronpedia page or None)."""
    present = sorted(_present(ctx), key=lambda sd: sd[0]["lead"])  # the findings' last
    columns = [c for _, data in present for c in data.get("columns", [])]
    owner = [data for _, data in present for _ in data.get("columns", [])]
    rows = []
    for key in keys:
        cells = []
        for col, data in zip(columns, owner, strict=True):
            value = data.get("cells", {}).get(key, {}).get(col["key"])
            cells.append({"kind": col["kind"], "value": value, "sort": sort_value(value)})
        links = [d.get("cells", {}).get(key, {}).get("neuronpedia") for _, d in present]
        rows.append({"key": key, "id": ids[key], "cells": cells,
                     "neuronpedia": next((u for u in links if u), None)})
    filled = [n for n in range(len(columns)) if any(r["cells"][n]["value"] not in (None, [], "")
                                                     for r in rows)]
    return {"columns": [columns[n] for n in filled],
            "rows": [{**r, "cells": [r["cells"][n] for n in filled]} for r in rows]}


def sort_value(value: Any) -> str:
    """What a cell sorts by, as text for ``data-v``: a number, a string, or "" (sorts last)."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, list):
        value = " ".join(map(str, value))
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


def drilldowns(ctx: dict[str, Any], keys: list[tuple[int, int]], ids: dict) -> list[dict]:
    """Step 4: {key, id, layer, latent, cells, parts: [{template, name, data}]} per latent;
    ``cells`` merges every section's table cells of the latent (for its summary line)."""
    out = []
    for key in keys:
        cells = {k: v for _, data in _present(ctx) for k, v in data.get("cells", {}).get(key,
                                                                                     {}).items()}
        parts = [{"template": s["latent_template"], "name": s["name"],
                  "data": data["latents"][key]}
                 for s, data in _present(ctx)
                 if s["latent_template"] and key in data.get("latents", {})]
        explained = ctx.get("explain") and ctx["explain"]["latents"].get(key)
        out.append({"key": key, "id": ids[key], "layer": key[0], "latent": key[1],
                    "cells": cells, "explanation": explained and explained.get("explanation"),
                    "parts": parts})
    return out
