"""The across-behaviours section: do this run and other runs (other behaviours, one model and
SAE) share the latents that cause them? Shown when the report is given ``--with OTHER``.

1. :func:`latentaudit.explain.across_runs` on this run and the others: it checks that they share
   the model (a fine-tune counts as its base) and the SAE, and gives the overlap of the top-K
   lists at K = 1, 10, 100 against the overlap two unrelated rankings would give (exact
   hypergeometric p-value), and the latents in the top ``TOP_K`` of at least two runs.
2. Each run is named by its folder (:func:`~latentaudit.explain.across.run_names`); each
   shared latent gets, per run, its rank, its Δ-attribution, its steering effect in that run's
   sweep when it was steered there (the paired change away and toward on the run's own model,
   from ``steering.jsonl``) and its logit lens.
3. Table cell ``also`` of the ranked-latents table: the latent's rank in the other runs where
   it is in their top ``TOP_K``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentaudit.explain.across import run_names
from latentaudit.report.read import read_jsonl_if
from latentaudit.runfolder import RunFolder

TOP_K = 100
"""The top of a run's ranking in which a latent counts as shared."""
COLUMNS = [{"key": "also", "label": "other runs", "title": "rank of the latent in the other "
            "runs given with --with, where it is in their top 100", "kind": "text",
            "first": "asc"}]
FIX = "rerun `latentaudit steer` for that run, or leave it out of --with."


def steering_effects(path: Path) -> dict[int, dict[str, float | None]]:
    """{latent: {"away": paired change, "toward": ...}} of the latents a run's sweep steered
    alone on its own model, at the searched or else the largest strength (the steering
    section's table cell)."""
    from latentaudit.report.sections.steering import headline

    rows = read_jsonl_if(path / "steering.jsonl", FIX,
                         need=("method", "latents", "direction", "strength")) or []
    by_latent: dict[int, list[dict]] = {}
    for r in rows:
        if len(r["latents"]) == 1:
            by_latent.setdefault(int(r["latents"][0]), []).append(r)
    out = {}
    for latent, mine in by_latent.items():
        cells = {d: headline(mine, d) for d in ("away", "toward")}
        if any(cells.values()):
            out[latent] = {d: c and c["value"] for d, c in cells.items()}
    return out


def load(run: Path, others: list[Path] | None) -> dict[str, Any] | None:
    """The section's dict (steps 1–3), or None without other runs."""
    if not others:
        return None
    from latentaudit.explain.across import across_runs

    paths = [run, *others]
    table = across_runs(paths, top_k=TOP_K, min_runs=2, flag="--with")
    folders = [RunFolder.open(p, "--with") for p in paths]
    names = run_names(paths)
    effects = [steering_effects(p) for p in paths]
    lens = [{(r["layer"], r["latent"]): r.get("logit_lens_top_tokens") or []
             for r in f.ranking} for f in folders]
    latents = []
    for row in table["latents"]:
        key = (row["layer"], row["latent"])
        latents.append({**row, "lens": next((x[key] for x in lens if x.get(key)), []),
                        "steering": [e.get(row["latent"]) for e in effects]})
    overlap = [{**o, "a": names[o["runs"][0]], "b": names[o["runs"][1]]}
               for o in table["overlap"]]
    cells = {}
    for row in latents:
        ranks = [f"#{r} in {names[i]}" for i, r in enumerate(row["ranks"]) if i and r]
        if ranks:
            cells[(row["layer"], row["latent"])] = {"also": ", ".join(ranks)}
    return {"runs": [{"name": n, "path": str(p), "model": f.model_name}
                     for n, p, f in zip(names, paths, folders, strict=True)],
            "top_k": TOP_K, "overlap": overlap, "shared": latents, "names": names,
            "columns": COLUMNS, "cells": cells}
