"""The findings section: the run's answer first, computed by :mod:`latentaudit.report.findings`.

1. Read what the rules need, without torch: the run's Δ-attribution (``ranking.jsonl``, and
   ``attribution.safetensors`` for steered latents outside the ranking), explain's
   ``exact.json``, the sweep's ``steering.jsonl``, ``steering_logodds.jsonl``,
   ``steering_summary.json`` (its latent sets) and ``steer/manifest.json`` (layer, rubric).
2. The behaviour in one sentence, from the rubric the sweep (or ``pipeline.json``) names.
3. The findings dict (also written as ``RUN/findings.json`` by the report), and per latent its
   verdict and disagreements for the ranked-latents table.
4. :func:`summary_lines`: the same as plain lines (``latentaudit report RUN --summary``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentaudit.report import findings as rules
from latentaudit.report.read import read_json_if, read_jsonl_if, read_tensors

FIX = "rerun the stage that wrote it (or move it away)."
FILE = "findings.json"
COLUMNS = [
    {"key": "verdict", "label": "verdict", "title": "steering verdict (rules at the top of the "
     "page): supported, contradicted, inconclusive, or control for a random latent",
     "kind": "verdict", "first": "asc"},
]


def load(run: Path, explain: Path, steering: Path,
         run_layers: list[int] | None = None) -> dict[str, Any] | None:
    """The section's dict; None when the run has neither steering nor an exactness check."""
    if not any(p.is_file() for p in (explain / "exact.json", steering / "steering.jsonl",
                                      steering / "steering_logodds.jsonl")):
        return None
    inputs = gather(run, explain, steering, run_layers)
    if not inputs.exact and not inputs.steering and not inputs.logodds:
        return None
    found = rules.findings(inputs)
    cells = {(f["layer"], f["latent"]): {"verdict": f["verdict"]} for f in found["latents"]
             if f["verdict"]}
    return {"findings": found, "columns": COLUMNS if cells else [], "cells": cells,
            "latents": {(f["layer"], f["latent"]): f for f in found["latents"]
                        if f["verdict"] or f["disagreements"]}}


def gather(run: Path, explain: Path, steering: Path,
           run_layers: list[int] | None = None) -> rules.Inputs:
    """Step 1 and 2: the rules' inputs from the run's files."""
    work = read_json_if(steering / "steer" / "manifest.json", FIX) or {}
    layer = work.get("layer")
    if run_layers is None:
        run_layers = (read_json_if(run / "manifest.json", FIX) or {}).get("layers")
    if layer is None and run_layers and len(run_layers) == 1:
        layer = run_layers[0]
    rows = read_jsonl_if(steering / "steering.jsonl", FIX,
                         need=("method", "latents", "direction", "strength")) or []
    logodds = read_jsonl_if(steering / "steering_logodds.jsonl", FIX,
                            need=("latents", "direction", "strength")) or []
    summary = read_json_if(steering / "steering_summary.json", FIX) or {}
    exact = read_json_if(explain / "exact.json", FIX) or {}
    told = (read_json_if(explain / "manifest.json", FIX) or {}).get("exactness") or {}
    inputs = rules.Inputs(
        behaviour=behaviour(work.get("rubric") or _pipeline_rubric(run)),
        steer_layer=None if layer is None else int(layer),
        exact={int(L): {**(told.get(str(L)) or {}), **e}
               for L, e in (exact.get("layers") or {}).items()
               if isinstance(e, dict) and e.get("latents")},
        steering=rows, logodds=logodds, sets=summary.get("sets") or {},
        summary=[r for r in summary.get("summary") or [] if isinstance(r, dict)])
    inputs.first_order = first_order(run, inputs)
    return inputs


def _pipeline_rubric(run: Path) -> str | None:
    record = read_json_if(run / "pipeline.json", FIX) or {}
    for stage in (record.get("stages") or {}).values():
        name = ((stage or {}).get("config") or {}).get("rubric")
        if isinstance(name, str):
            return name
    return None


def behaviour(rubric: str | None) -> str | None:
    """Step 2: "This run looks for <the rubric's description, first clause>." (None when the
    rubric cannot be read)."""
    if not rubric:
        return None
    from latentaudit._io import named_or_file
    from latentaudit.judges.rubrics import shipped_dir

    path = named_or_file(rubric, shipped_dir(), ".json")
    try:
        spec = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, json.JSONDecodeError):
        return None
    desc = str(spec.get("description") or "").strip()
    text = desc.split(":")[0].split(", after ")[0].split(". ")[0].strip().rstrip(".")
    name = spec.get("name", rubric)
    if not text:
        return None
    if text.startswith(("A ", "An ")):  # the description opens with its scale, not the behaviour
        return (f"This run looks for what rubric {name} grades positive ({desc.rstrip('.')}): "
                "which latents make the model's completions show it.")
    return (f"This run looks for {text[0].lower() + text[1:]} (rubric {name}): which latents "
            "make the model's completions show it.")


def first_order(run: Path, inputs: rules.Inputs) -> dict[tuple[int, int], float]:
    """The run's Δ-attribution of every latent the findings speak of."""
    want = {(L, i) for L, e in inputs.exact.items() for i in e["latents"]}
    if inputs.steer_layer is not None:
        want |= {(inputs.steer_layer, r["latents"][0]) for r in inputs.steering + inputs.logodds
                 if len(r.get("latents") or []) == 1}
    out = {}
    for r in read_jsonl_if(run / "ranking.jsonl", FIX) or []:
        key = (r.get("layer"), r.get("latent"))
        if key in want and r.get("delta_attribution") is not None:
            out[key] = float(r["delta_attribution"])
    rest = want - out.keys()
    if rest and (run / "attribution.safetensors").is_file():
        layers = sorted({L for L, _ in rest})
        manifest = read_json_if(run / "manifest.json", FIX) or {}
        several = len(manifest.get("layers") or []) > 1
        names = {L: f"delta_attribution_layer{L}" if several else "delta_attribution"
                 for L in layers}
        arrays = read_tensors(run / "attribution.safetensors", FIX, tuple(names.values()))
        for L, i in rest:
            v = arrays.get(names[L])
            if v is not None and 0 <= i < len(v):
                out[(L, i)] = float(v[i])
    return out


def summary_lines(f: dict[str, Any]) -> list[str]:
    """The findings as plain lines (``latentaudit report --summary``)."""
    lines = [f["behaviour"] or "The behaviour: what the run's judge graded positive."]
    v = f["verdicts"]
    if any(v.values()):
        lines.append(f"Steered latents: {v['supported']} supported, {v['contradicted']} "
                     f"contradicted, {v['inconclusive']} inconclusive, {v['control']} random "
                     "controls.")
    else:
        lines.append("No latent was steered with sampling: run `latentaudit steer` to test "
                     "the ranking.")
    for x in f["latents"]:
        if x["verdict"] and x["verdict"] != "control":
            lines.append(f"  latent {x['latent']} ({x['method']}): {x['verdict']}: "
                         f"{x['reason']}")
    lines += [f"  {m['sentence']}" for m in f["methods"]]
    for t in f["trust"]:
        rho = "–" if t["rho"] is None else f"{t['rho']:.2f}"
        ci = f" [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]" if t["ci"] else " (no interval)"
        lines.append(f"First-order vs exact Δ, layer {t['layer']}: Spearman ρ {rho}{ci} over "
                     f"{t['latents']} latents and {t['pairs']} pairs, {t['sign_flips']} sign "
                     "flips" + (f". Warning: {t['warning']}." if t["warning"] else "."))
    dis = [(x, d) for x in f["latents"] for d in x["disagreements"]]
    lines.append(f"Disagreements: {f['disagreements']}." if f["disagreements"] else
                 "Disagreements: none.")
    lines += [f"  {d}" for d in f.get("set_disagreements") or []]
    lines += [f"  latent {x['latent']}: {d}" for x, d in dis]
    return lines
