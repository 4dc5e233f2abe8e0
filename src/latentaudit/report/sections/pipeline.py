"""The pipeline section: how `latentaudit run` made the run, from ``pipeline.json``.

1. Read ``RUN/pipeline.json`` (absent for a run made stage by stage: the section is left out).
2. Its ``notes`` (what the run made small or skipped, e.g. the demo's sizes) go first, then one
   row per stage: status, time and a one-line account of what it did, from its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentaudit.report.read import read_json_if

FIX = "rerun `latentaudit run` to write it again, or move it away."


def load(run: Path) -> dict[str, Any] | None:
    record = read_json_if(run / "pipeline.json", FIX)
    if not isinstance(record, dict):
        return None
    stages = [{"name": name, "status": rec.get("status", ""), "time": _time(rec.get("seconds")),
               "what": describe(name, rec)}
              for name, rec in (record.get("stages") or {}).items() if name != "report"]
    return {"notes": [str(n) for n in record.get("notes") or []], "stages": stages,
            "config": record.get("config"), "entry": record.get("entry")}


def _time(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe(name: str, rec: dict[str, Any]) -> str:
    """What a stage did, in one line (its reason when it did not run)."""
    s = rec.get("summary") or {}
    if rec.get("status") != "done" or not s:
        return rec.get("reason") or ""
    what = _what(name, s)
    load = s.get("model_load_seconds")
    return f"{what} (the time includes loading the model: {load:.0f} s)" \
        if isinstance(load, (int, float)) and what else what


def _what(name: str, s: dict[str, Any]) -> str:
    try:
        if name == "sample":
            return f"{s['completions']} completions of {s['prompts']} prompts"
        if name == "judge":
            return (f"{s['completions']} completions graded by {s['judge']}: "
                    f"{s['positive']} positive, {s['negative']} negative, {s['excluded']} "
                    "excluded")
        if name == "pair":
            return (f"{s['pairs']} pairs from {s['prompts_with_pairs']} of {s['prompts']} "
                    "prompts")
        if name == "attribute":
            return (f"layer {s['layer']}: {s['pairs']} pairs, {s['completions']} completions, "
                    f"{s['tokens']} tokens")
        if name == "explain":
            return (f"{len(s['latents'])} latents; examples from {s['corpus_tokens']} tokens of "
                    "reference text")
        if name == "circuit":
            return "; ".join(f"{len(h['targets'])} targets at layer {h['target_layer']}, "
                             f"{h['edges_kept']} edges kept from layer {h['upstream_layer']}"
                             for h in s["hops"]) or "no hop"
        if name == "steer":
            return f"{s['rows']} conditions on {s['prompts']} held-out prompts"
    except (KeyError, TypeError):
        pass
    return ""
