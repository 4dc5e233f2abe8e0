"""The monitors section: would the latents have flagged the behaviour on held-out completions?

1. Read ``monitor_eval.json`` of ``latentaudit monitor evaluate`` (the section exists when the
   folder holds it) and check every field the page shows, naming the file and field of a problem.
2. The AUC table, one row per latent set and K, as ``auc_table.md`` has it: for ranked and given
   sets the latents active on ≥ 1 completion, how many latents' AUC interval lies above / below
   ½, the rank-1 latent's AUC [CI] and the median single-latent AUC (mean / max activation); per
   evaluation mode (``cv``, ``transfer``) the combination's AUC [CI] and precision at the chosen
   recall. Random sets are summarised over their draws (mean AUC and the range over draws, not
   an interval); the residual probe (the ceiling) comes last.
3. The ROC figure: ``roc.png`` inlined as it is, else drawn from the JSON's ROC points by
   :func:`latentaudit.monitor.report.roc_plot` (:func:`~latentaudit.report.figures.roc_curves`).
4. Per latent of the ranked and given sets (AUC = ROC AUC of its mean activation over a
   completion's tokens as a score, no fitting): a cell of the ranked-latents table, and a
   drill-down part (mean and max activation: AUC, interval, precision at recall) for the latents
   the page shows: the run's ranked latents, the Δ-attribution top K and the given latents. The
   Δ-activation top K outside the ranking stay in this section's own latent table.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError
from latentaudit.monitor.report import MODES, RESULTS_FILE, groups
from latentaudit.report import figures
from latentaudit.report.read import read_json_if

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""The ``schema_version`` of ``monitor_eval.json`` this section reads (the writer's
:data:`latentaudit.monitor.evaluate.SCHEMA_VERSION`; that module imports torch, the report
does not)."""

FIX = "rerun `latentaudit monitor evaluate` (or pass --monitor with its --out folder)."
MODE_LABELS = {"cv": "CV", "transfer": "fit on training file"}
SHOWN = ("Δ-attribution", "given")
"""Sets whose latents get a drill-down even outside the run's ranking."""
COLUMNS = [
    {"key": "monitor_auc", "label": "monitor AUC", "title": "ROC AUC of the latent's mean "
     "activation over a held-out completion as a detector of the behaviour (½ = chance), with "
     "its bootstrap interval over prompts (latentaudit monitor evaluate)", "kind": "auc",
     "first": "desc"},
]


def load(folder: Path, run_layers: list[int] | None = None,
         run_latents: frozenset[tuple[int, int]] | None = None) -> dict[str, Any] | None:
    """The section's dict, or None when ``folder`` holds no ``monitor_eval.json``."""
    path = folder / RESULTS_FILE
    results = read_json_if(path, FIX)
    if results is None:
        return None
    check(results, path)
    cfg = results["config"]
    modes = [m for m in MODES if m in results["probe"]]
    data = {"path": str(path), "settings": settings(results), "counts": counts(results),
            "modes": [{"key": m, "label": MODE_LABELS[m], "about": MODES[m]} for m in modes],
            "level": f"{cfg['level']:.0%}", "recall": f"{cfg['recall']:g}",
            "bootstrap": cfg.get("bootstrap"), "note": None, "columns": COLUMNS, "cells": {},
            "latents": {}}
    data["every_latent"] = per_latent(data, results, run_layers, run_latents)
    anchors = {e["latent"]: e["anchor"] for e in data["every_latent"] if e["anchor"]}
    data["rows"] = auc_rows(results, modes, anchors)
    uri = figures.file_uri(folder / "roc.png")
    data["figure"] = {"uri": uri or figures.roc_curves(results), "drawn": uri is None}
    return data


# -- step 1: the fields the page reads ---------------------------------------------------------

def _fail(path: Path, where: str, problem: str = "is missing") -> LatentAuditError:
    return LatentAuditError(f"{path}: field '{where}' {problem}; {FIX}")


def _need(obj: Any, keys: tuple[str, ...], where: str, path: Path) -> None:
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            raise _fail(path, where + k)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numbers(obj: dict[str, Any], keys: tuple[str, ...], where: str, path: Path) -> None:
    """The fields in ``keys`` are numbers (NaN allowed: an AUC of one class is undefined)."""
    _need(obj, keys, where, path)
    for k in keys:
        if not isinstance(obj[k], (int, float)) or isinstance(obj[k], bool):
            raise _fail(path, where + k, f"is {obj[k]!r}, not a number")


def check(results: Any, path: Path) -> None:
    """Raise a LatentAuditError naming the file and field the page cannot read."""
    _need(results, ("schema_version", "model", "layer", "config", "counts", "sets", "probe"),
          "", path)
    if results["schema_version"] != SCHEMA_VERSION:
        raise _fail(path, "schema_version", f"is {results['schema_version']!r}; this "
                    f"latentaudit reads {SCHEMA_VERSION}")
    if not _whole(results["layer"]):
        raise _fail(path, "layer", "must be a layer number")
    _numbers(results["config"], ("level", "recall"), "config.", path)
    _need(results["counts"], ("path", "completions", "positive", "negative", "prompts"),
          "counts.", path)
    if not isinstance(results["sets"], list):
        raise _fail(path, "sets", "must be a list")
    for n, s in enumerate(results["sets"]):
        where = f"sets[{n}]."
        _need(s, ("method", "k", "per_latent", "median_auc_mean", "median_auc_max",
                  "combination"), where, path)
        if not _whole(s["k"]) or not isinstance(s["per_latent"], list):
            raise _fail(path, where + ("k" if not _whole(s["k"]) else "per_latent"),
                        "has the wrong type")
        for m, r in enumerate(s["per_latent"]):
            row = f"{where}per_latent[{m}]."
            _need(r, ("latent", "fires", "mean", "max"), row, path)
            for k, problem in (("latent", "must be a latent id"),
                               ("fires", "must be a count of completions")):
                if not _whole(r[k]):
                    raise _fail(path, row + k, problem)
            for score in ("mean", "max"):
                _need(r, (score,), row, path)
                _numbers(r[score], ("auc",), f"{row}{score}.", path)
        _combination(s["combination"], where + "combination.", path)
    _combination(results["probe"], "probe.", path)


def _combination(c: Any, where: str, path: Path) -> None:
    _need(c, ("cv",), where, path)
    for mode in (m for m in MODES if m in c):
        _numbers(c[mode], ("auc", "ci_low", "ci_high", "precision"), f"{where}{mode}.", path)
        _need(c[mode], ("roc",), f"{where}{mode}.", path)
        _need(c[mode]["roc"], ("fpr", "tpr"), f"{where}{mode}.roc.", path)


# -- step 2: settings, counts and the AUC table -----------------------------------------------

def settings(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: model, layer, SAE, attribution run, options."""
    sae = results.get("sae") or {}
    cfg = results["config"]
    rows = [("model", results["model"]), ("layer", results["layer"]),
            ("SAE", f"{sae.get('path')} (digest {sae.get('digest')}, d_sae {sae.get('d_sae')})"
             if sae else None),
            ("attribution run", results.get("run")),
            ("options", ", ".join(f"{k}={v}" for k, v in cfg.items()))]
    return [(k, str(v)) for k, v in rows if v is not None]


def counts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation file's counts, then the training file's (``--train``) when given."""
    out = []
    for which, c in (("evaluation file", results["counts"]),
                     ("training file", results.get("train_counts"))):
        if isinstance(c, dict):
            n = c.get("completions") or 0
            out.append({"which": which, "path": c.get("path"), "completions": n,
                        "prompts": c.get("prompts"), "positive": c.get("positive"),
                        "negative": c.get("negative"), "excluded": c.get("excluded"),
                        "flag_all": c["positive"] / n if n and _number(c.get("positive"))
                        else None})
    return out


def label(method: str, k: int) -> str:
    return "given latents" if method == "given" else f"{method} top-{k}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mode(c: dict[str, Any]) -> dict[str, Any]:
    return {"auc": c["auc"], "ci": [c["ci_low"], c["ci_high"]], "range": None,
            "precision": c["precision"]}


def auc_rows(results: dict[str, Any], modes: list[str], anchors: dict[int, str]
             ) -> list[dict[str, Any]]:
    """Step 2: one row per (method, K) in first-seen order, then the residual probe."""
    rows = [random_row(k, rs, modes) if method == "random" else set_row(method, k, rs[0],
                                                                        modes, anchors)
            for method, k, rs in groups(results["sets"])]
    return rows + [{"label": "residual probe (mean residual)", "k": results.get("d_model"),
                    "active": None, "above": None, "below": None, "first": None,
                    "median_mean": None, "median_max": None,
                    "modes": {m: _mode(results["probe"][m]) for m in modes}}]


def _beyond(r: dict[str, Any], side: str) -> bool:
    """Whether the interval of a latent's mean-activation AUC lies above / below ½."""
    bound = r["mean"].get("ci_low" if side == "above" else "ci_high")
    return _number(bound) and (bound > 0.5 if side == "above" else bound < 0.5)


def set_row(method: str, k: int, s: dict[str, Any], modes: list[str], anchors: dict[int, str]
            ) -> dict[str, Any]:
    lat = s["per_latent"]
    first = None
    if lat:
        m = lat[0]["mean"]
        first = {"latent": lat[0]["latent"], "anchor": anchors.get(lat[0]["latent"]),
                 "auc": m["auc"], "ci": [m.get("ci_low"), m.get("ci_high")]}
    return {"label": label(method, k), "k": k, "active": sum(r["fires"] > 0 for r in lat),
            "above": sum(_beyond(r, "above") for r in lat),
            "below": sum(_beyond(r, "below") for r in lat), "first": first,
            "median_mean": s["median_auc_mean"], "median_max": s["median_auc_max"],
            "modes": {m: _mode(s["combination"][m]) for m in modes if m in s["combination"]}}


def random_row(k: int, rs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Random draws of one K: mean over draws, the range over draws instead of an interval."""
    lat = [r for s in rs for r in s["per_latent"]]
    row = {"label": f"random ({len(rs)} draws)", "k": k,
           "active": round(statistics.mean(sum(r["fires"] > 0 for r in s["per_latent"])
                                           for s in rs), 1),
           "above": None, "below": None, "first": None,
           "median_mean": statistics.median(r["mean"]["auc"] for r in lat) if lat else None,
           "median_max": statistics.median(r["max"]["auc"] for r in lat) if lat else None,
           "modes": {}}
    for m in modes:
        combos = [s["combination"][m] for s in rs if m in s["combination"]]
        if combos:
            aucs = [c["auc"] for c in combos]
            row["modes"][m] = {"auc": statistics.mean(aucs), "ci": None,
                               "range": [min(aucs), max(aucs)],
                               "precision": statistics.mean(c["precision"] for c in combos)}
    return row


# -- step 4: per latent ----------------------------------------------------------------------

def _sort(x: Any) -> str:
    return repr(float(x)) if _number(x) else ""


def per_latent(data: dict[str, Any], results: dict[str, Any], run_layers: list[int] | None,
               run_latents: frozenset[tuple[int, int]] | None) -> list[dict[str, Any]]:
    """Table cells and drill-downs (into ``data``); returns every latent of the ranked and given
    sets once, in first-seen order, for the section's own table."""
    layer = results["layer"]
    matched = run_layers is None or layer in run_layers
    if not matched:
        data["note"] = (f"The evaluation read layer {layer} and the run has layer(s) "
                        f"{', '.join(map(str, run_layers))}: its latents are not matched to the "
                        "ranked-latents table.")
        log.warning("%s: %s", data["path"], data["note"])
    several = run_layers is not None and len(run_layers) > 1
    entries: dict[int, dict[str, Any]] = {}
    for s in results["sets"]:
        if s["method"] == "random":
            continue
        for r in s["per_latent"]:
            e = entries.setdefault(r["latent"], {
                "latent": r["latent"], "layer": layer, "fires": r["fires"],
                "completions": results["counts"]["completions"], "mean": r["mean"],
                "max": r["max"], "sets": [], "methods": set(), "level": data["level"],
                "recall": data["recall"], "anchor": None,
                "sort": {"auc_mean": _sort(r["mean"]["auc"]),
                         "auc_max": _sort(r["max"]["auc"]),
                         "precision": _sort(r["mean"].get("precision"))}})
            if s["method"] not in e["methods"]:  # top-10 is the head of top-20: once a method
                e["sets"].append({"label": "given latents" if s["method"] == "given"
                                  else s["method"], "rank": r.get("rank")})
                e["methods"].add(s["method"])
    for i, e in entries.items():
        key = (layer, i)
        if not matched:
            continue
        data["cells"][key] = {"monitor_auc": {"value": e["mean"]["auc"],
                                              "low": e["mean"].get("ci_low"),
                                              "high": e["mean"].get("ci_high")}}
        if run_latents is None or key in run_latents or e["methods"] & set(SHOWN):
            e["anchor"] = f"latent-{layer}-{i}" if several else f"latent-{i}"
            data["latents"][key] = e
    return list(entries.values())
