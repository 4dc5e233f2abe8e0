"""The steering section: the sweep's figures and tables, and each steered latent's evidence.

1. Read ``steering.jsonl`` and ``steering_logodds.jsonl`` (the section exists when either does),
   ``steering_summary.json``, the figures ``steering_away.png`` / ``steering_toward.png`` and
   their ``_sorted`` twins (inlined as they are) and the work files ``steer/manifest.json``.
2. Per latent steered alone: its rows of the table and of the log-odds check, the table cells
   (the paired change in the behaviour rate away and toward, at the searched strength or else
   the largest one, on the model under study), and a few example completions per condition
   from ``steer/completions.jsonl`` graded in ``steer/judged.jsonl``, each beside its unsteered
   twin (same prompt and seed). Examples where the grade flipped the steered way come first.
3. When the sweep ran the model-diffing baseline (``steer/model_diff.safetensors``), every
   latent of the table gets its Δ_model (mean activation on the model under study minus on the
   base model, same text) and its rank by it: the ranked table's "model diff" columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentaudit.report import figures
from latentaudit.report.read import iter_jsonl, read_json_if, read_jsonl_if
from latentaudit.runfolder import ConditionKey

FIX = "rerun `latentaudit steer` (or pass --steering with its --out folder)."
EXAMPLES_SHOWN = 3
TEXT_CHARS = 1200
COLUMNS = [
    {"key": "away", "label": "steer away", "title": "paired change in the behaviour rate when "
     "steering away (searched or largest strength); * beyond the random latents' range",
     "kind": "pct", "first": "asc"},
    {"key": "toward", "label": "steer toward", "title": "paired change in the behaviour rate "
     "when steering toward; * beyond the random latents' range", "kind": "pct", "first": "desc"},
    {"key": "sets", "label": "steered as", "title": "selection methods that picked the latent",
     "kind": "text", "first": "asc"},
]
FLIP = {"away": ("positive", "negative"), "toward": ("negative", "positive")}
DIFF_COLUMNS = [
    {"key": "model_diff", "label": "model diff", "title": "mean activation on the model under "
     "study minus on the base model, on the same completions (model-diffing baseline)",
     "kind": "num", "first": "desc"},
    {"key": "model_diff_rank", "label": "diff rank", "title": "rank by model diff among all "
     "latents", "kind": "int", "first": "asc"},
]


def load(folder: Path, run_layers: list[int] | None = None,
         run_latents: frozenset[tuple[int, int]] | None = None) -> dict[str, Any] | None:
    """The section's dict, or None when ``folder`` holds no steering files; ``run_layers``
    gives the layer when the work files do not (a sweep steers a one-layer run), and
    ``run_latents`` the ranked latents that get a model-diff cell (step 3)."""
    rows = read_jsonl_if(folder / "steering.jsonl", FIX,
                         need=("method", "latents", "direction", "strength"))
    logodds = read_jsonl_if(folder / "steering_logodds.jsonl", FIX,
                            need=("latents", "direction", "strength"))
    if rows is None and logodds is None:
        return None
    rows, logodds = rows or [], logodds or []
    summary = read_json_if(folder / "steering_summary.json", FIX) or {}
    work = read_json_if(folder / "steer" / "manifest.json", FIX) or {}
    layer = work.get("layer")
    if layer is None and run_layers and len(run_layers) == 1:
        layer = run_layers[0]
    figs = [{"direction": d.replace("_", ", "), "uri": figures.file_uri(
        folder / f"steering_{d}.png")} for d in ("away", "away_sorted", "toward",
                                                   "toward_sorted")]
    data = {"path": str(folder), "layer": layer, "settings": settings(work, summary),
            "summary": summary.get("summary") or [], "sets": summary.get("sets") or {},
            "rows": rows, "logodds": logodds,
            "figures": [f for f in figs if f["uri"]], "columns": columns(rows), "cells": {},
            "latents": {}}
    if layer is not None:
        per_latent(data, int(layer), examples(folder))
        model_diff_cells(data, folder, int(layer), run_latents or frozenset())
    return data


def model_diff_cells(data: dict[str, Any], folder: Path, layer: int,
                     run_latents: frozenset[tuple[int, int]]) -> None:
    """Step 3: the model-diff columns for the ranked and the steered latents."""
    path = folder / "steer" / "model_diff.safetensors"
    if not path.is_file():
        return
    import numpy as np
    from safetensors.numpy import load_file

    diff = load_file(str(path)).get("model_diff")
    if diff is None:
        return
    diff = diff.astype(np.float64)
    order = np.argsort(-diff, kind="stable")
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(1, len(order) + 1)
    keys = {k for k in run_latents if k[0] == layer} | set(data["cells"])
    for L, i in keys:
        if L == layer and 0 <= i < len(diff):
            data["cells"].setdefault((L, i), {}).update(
                {"model_diff": float(diff[i]), "model_diff_rank": int(rank[i])})
    data["columns"] = data["columns"] + DIFF_COLUMNS


def columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table columns this sweep can fill: a direction it never steered has none."""
    steered = {r["direction"] for r in rows}
    return [c for c in COLUMNS if c["key"] not in ("away", "toward") or c["key"] in steered]


def settings(work: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of how the sweep sampled and graded."""
    cfg = work.get("config") or {}
    rows = [("model", work.get("model")), ("toward model", work.get("toward_model")),
            ("base model (model diff)", work.get("base_model")), ("SAE", work.get("sae")),
            ("layer", work.get("layer")), ("rubric", work.get("rubric")),
            ("judge", work.get("judge")), ("coherence judge", work.get("coherence_judge")),
            ("held-out prompts", len(work.get("prompt_ids") or []) or summary.get("prompts")),
            ("samples per prompt", cfg.get("n")),
            ("strengths", f"{cfg.get('strengths')} ({work.get('scale')})"
             if cfg.get("strengths") else None),
            ("mean residual norm r̄", f"{summary['resid_norm']:.4g}"
             if isinstance(summary.get("resid_norm"), (int, float)) else None),
            ("sampling", f"temperature {work.get('temperature')}, top-p {work.get('top_p')}, "
                         f"{work.get('max_new_tokens')} new tokens, seed {work.get('seed')}"
             if work else None)]
    return [(k, str(v)) for k, v in rows if v is not None]


def per_latent(data: dict[str, Any], layer: int,
               graded: dict[ConditionKey, list[dict]]) -> None:
    """Step 2: rows, cells and examples of every latent steered alone."""
    sets = {}
    for method, ids in data["sets"].items():
        for i in ids or []:
            sets.setdefault(i, []).append(method)
    singles = [r for r in data["rows"] if len(r["latents"]) == 1]
    ids = sorted({r["latents"][0] for r in singles} |
                 {r["latents"][0] for r in data["logodds"] if len(r["latents"]) == 1})
    for i in ids:
        mine = [r for r in singles if r["latents"][0] == i]
        conds = {(r["direction"], r["strength"], r.get("model", "main")) for r in mine}
        data["latents"][(layer, i)] = {
            "rows": mine,
            "logodds": [r for r in data["logodds"] if r["latents"] == [i]],
            "examples": [{"direction": d, "strength": s, "model": m,
                          "items": graded.get(ConditionKey((i,), d, s, m), [])[:EXAMPLES_SHOWN]}
                         for d, s, m in sorted(conds, key=str)]}
        data["cells"][(layer, i)] = {"away": headline(mine, "away"),
                                     "toward": headline(mine, "toward"),
                                     "sets": ", ".join(sets.get(i, []))}


def headline(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The table cell of one direction: {value, beyond} at the searched or largest strength."""
    mine = [r for r in rows if r["direction"] == direction and r.get("model", "main") == "main"
            and r.get("diff") is not None]
    if not mine:
        return None
    best = max(mine, key=lambda r: (bool(r.get("searched")), r["strength"]))
    return {"value": best["diff"], "beyond": bool(best.get("beyond_null"))}


def examples(folder: Path) -> dict[ConditionKey, list[dict[str, Any]]]:
    """{condition key: example pairs, most telling first} of the conditions that steer one
    latent, from the work files (step 2)."""
    comp, judged = folder / "steer" / "completions.jsonl", folder / "steer" / "judged.jsonl"
    if not comp.is_file():
        return {}
    grades = {}
    if judged.is_file():
        for _, g in iter_jsonl(judged, FIX):
            grades[(_key(g), g.get("prompt_id"), g.get("sample_index"))] = g
    texts: dict[tuple, str] = {}
    for _, row in iter_jsonl(comp, FIX):
        key = _key(row)
        if key is not None and len(key.latents) <= 1:
            texts[(key, row.get("prompt_id"), row.get("sample_index"))] = \
                str(row.get("completion", ""))
    out: dict[ConditionKey, list[dict]] = {}
    for (key, pid, s), text in texts.items():
        if key.is_base:
            continue
        g, g0 = grades.get((key, pid, s), {}), grades.get((key.base, pid, s), {})
        out.setdefault(key, []).append({
            "prompt_id": pid, "sample_index": s, "text": _clip(text),
            "outcome": g.get("outcome"), "why": g.get("why"), "incoherent": g.get("incoherent"),
            "base_text": _clip(texts.get((key.base, pid, s), "")),
            "base_outcome": g0.get("outcome")})
    for key, items in out.items():
        items.sort(key=lambda e, d=key.direction: (_telling(e, d), str(e["prompt_id"]),
                                                    e["sample_index"]))
    return out


def _key(row: dict[str, Any]) -> ConditionKey | None:
    return None if row.get("key") is None else ConditionKey.parse(row["key"])


def _telling(e: dict[str, Any], direction: str) -> int:
    """0: flipped the steered way; 1: grade changed otherwise; 2: unchanged or ungraded."""
    if (e["base_outcome"], e["outcome"]) == FLIP.get(direction):
        return 0
    return 1 if e["outcome"] != e["base_outcome"] else 2


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + " …"
