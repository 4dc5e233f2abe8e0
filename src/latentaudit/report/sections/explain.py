"""The explain section: corpus and exactness, and each explained latent's evidence.

1. Read ``explain/manifest.json`` (corpus, content warnings, exactness per layer, histogram
   edges), ``latents.jsonl`` (the section exists when this file does), and when present
   ``exact.json``, ``completions.jsonl`` with ``token_maps.safetensors``.
2. Content warnings: the manifest's, plus those :func:`latentaudit.data.corpus.content_warning`
   gives for each source the corpus spec names (``held-out``: the training mix); shown wherever
   corpus text is.
3. Per layer: the exactness summary and the exact-against-first-order figure.
4. Per latent: logit lens, the output effect (the tokens adding or ablating it moves through the
   layers above), density bars, the top-activating examples (highlight ∝ activation /
   the latent's largest), the attribution map's top tokens and the mapped completions with the
   largest |δ_i(C)| (highlight ∝ δ_{i,t} / the largest |δ_{i,t}| shown, red > 0, blue < 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentaudit.data.corpus import TRAINING_SOURCES, content_warning
from latentaudit.errors import LatentAuditError
from latentaudit.report import figures, findings, highlight
from latentaudit.report.findings import sign_of_value
from latentaudit.report.read import read_json_if, read_jsonl, read_tensors
from latentaudit.report.render import visible

FIX = "rerun `latentaudit explain` (or pass --explain with its --out folder)."
EXAMPLES_SHOWN = 10
MAPS_SHOWN = 4
EARLY = 16
"""Positions of a reference sequence that count as its start in :func:`describe_examples`."""
TOP_TOKENS = 8
COLUMNS = [
    {"key": "exact_delta", "label": "exact Δ", "title": "exact loss-gap change of mean-ablating "
     "the latent, on the exactness sample; ⇄ its first-order Δ on the same pairs has the other "
     "sign", "kind": "exact", "first": "desc"},
    {"key": "frequency", "label": "density", "title": "share of reference-text tokens on which "
     "the latent fires", "kind": "num", "first": "desc"},
]
FINAL_RANK = {"key": "final_rank", "label": "final rank", "title": "rank after re-scoring the "
              "top latents by their exact Δ", "kind": "int", "first": "asc"}


def load(folder: Path) -> dict[str, Any] | None:
    """The section's dict, or None when ``folder`` holds no latents.jsonl."""
    if not (folder / "latents.jsonl").is_file():
        return None
    manifest = read_json_if(folder / "manifest.json", FIX) or {}
    rows = read_jsonl(folder / "latents.jsonl", FIX, need=("layer", "latent"))
    corpus = manifest.get("corpus") or {}
    edges = manifest.get("density_histogram_edges") or []
    maps = _maps(folder)
    latents = {(r["layer"], r["latent"]): latent_view(r, edges, maps) for r in rows}
    rescored = bool((manifest.get("options") or {}).get("rescore"))
    exact = read_json_if(folder / "exact.json", FIX)
    return {"path": str(folder), "corpus": corpus, "warnings": warnings(corpus),
            "interpretation": manifest.get("interpretation"),
            "exactness": exactness(manifest, exact),
            "n_latents": len(rows), "n_maps": len(maps["rows"]) if maps else 0,
            "latents": latents,
            "columns": ([FINAL_RANK] if rescored else []) + COLUMNS,
            "cells": cells(latents, exact)}


def cells(latents: dict, exact: dict | None) -> dict[tuple[int, int], dict[str, Any]]:
    """Table cells of the explained latents, and the exact Δ of every latent exact.json
    covers (its numbers win: latents.jsonl copies them)."""
    out = {k: {"final_rank": v["final_rank"],
               "exact_delta": exact_cell(v["exact_delta"], v["first_order_delta"]),
               "frequency": (v["density"] or {}).get("frequency")} for k, v in latents.items()}
    for k, c in exact_cells(exact).items():
        out.setdefault(k, {}).update(c)
    return out


def exact_cell(exact: Any, first: Any) -> dict[str, Any] | None:
    """An exact-Δ cell: {value, flip}, flip when the first-order Δ of the same pairs has the
    other sign."""
    if exact is None:
        return None
    return {"value": exact, "first_order": first,
            "flip": sign_of_value(exact) * sign_of_value(first) < 0}


def exact_cells(exact: dict | None) -> dict[tuple[int, int], dict[str, Any]]:
    """Exact-Δ cells of every latent the exact check covers (explained or not)."""
    out = {}
    for L, e in ((exact or {}).get("layers") or {}).items():
        for i, x, f in zip(e.get("latents") or [], e.get("exact_delta") or [],
                           e.get("first_order_delta") or [], strict=False):
            out[(int(L), i)] = {"exact_delta": exact_cell(x, f)}
    return out


def warnings(corpus: dict[str, Any]) -> list[str]:
    """Step 2: the content warnings of the corpus text, each once."""
    found = list(corpus.get("content_warnings") or [])
    for part in str(corpus.get("spec") or "").replace("+", ",").split(","):
        names = TRAINING_SOURCES if part.strip() == "held-out" else (part.strip(),)
        found += [w for w in map(content_warning, names) if w]
    return list(dict.fromkeys(found))


def exactness(manifest: dict, exact: dict | None) -> list[dict[str, Any]]:
    """Step 3: one entry per layer of the exactness check."""
    out = []
    for L, e in (manifest.get("exactness") or {}).items():
        full = ((exact or {}).get("layers") or {}).get(str(L))
        trust = findings.trust(findings.Inputs(exact={int(L): {**e, **(full or {})}}))[0]
        entry = {"layer": L, "route": e.get("route"), "pairs": e.get("pairs"),
                 "spearman": e.get("spearman"), "latents": trust["latents"] if full else None,
                 "ci": trust["ci"], "warning": trust["warning"] if full else None,
                 "flips": trust["sign_flips"] if full else None,
                 "per_completion": e.get("spearman_per_completion_mean"), "figure": None}
        if full and full.get("latents"):
            entry["figure"] = figures.exactness_scatter(
                full["first_order_delta"], full["exact_delta"], full["latents"], int(L),
                full.get("spearman"))
        out.append(entry)
    return out


def _maps(folder: Path) -> dict[str, Any] | None:
    """The mapped completions and their per-token δ columns, when both files exist."""
    if not ((folder / "completions.jsonl").is_file() and
            (folder / "token_maps.safetensors").is_file()):
        return None
    rows = read_jsonl(folder / "completions.jsonl", FIX,
                      need=("offset", "n_tokens", "tokens", "delta"))
    arrays = read_tensors(folder / "token_maps.safetensors", FIX)
    _check_maps(folder, rows, arrays)
    columns = {(int(L), int(i)): c for c, (L, i) in
               enumerate(zip(arrays["layers"].tolist(), arrays["latents"].tolist(), strict=True))}
    return {"rows": rows, "delta": arrays["token_delta"], "columns": columns}


def _check_maps(folder: Path, rows: list[dict], arrays: dict[str, Any]) -> None:
    """The two files must describe the same tokens: name the first disagreement."""
    for name in ("token_delta", "layers", "latents"):
        if name not in arrays:
            raise LatentAuditError(f"{folder / 'token_maps.safetensors'} has no '{name}'; {FIX}")
    n_tokens = arrays["token_delta"].shape[0]
    for n, r in enumerate(rows, start=1):
        if len(r["tokens"]) != r["n_tokens"] or r["offset"] + r["n_tokens"] > n_tokens:
            raise LatentAuditError(f"{folder / 'completions.jsonl'}: row {n} does not match "
                                   f"token_maps.safetensors ({r['n_tokens']} tokens at offset "
                                   f"{r['offset']}); {FIX}")


def latent_view(row: dict[str, Any], edges: list[float], maps: dict | None) -> dict[str, Any]:
    """Step 4 for one latents.jsonl row."""
    lens = row.get("logit_lens") or {}
    amap = row.get("attribution_map") or None
    return {"final_rank": row.get("final_rank"), "exact_delta": row.get("exact_delta"),
            "first_order_delta": row.get("first_order_delta"),
            "explanation": row.get("explanation"),
            "described": describe_examples(row.get("top_examples") or []),
            "lens": {"cosine": lens.get("cosine") or [], "promoted": lens.get("promoted") or [],
                     "suppressed": lens.get("suppressed") or [],
                     "through_final_norm": lens.get("through_final_norm")},
            "effect": output_effect(row.get("output_effect")),
            "density": density(row.get("density"), edges),
            "examples": examples(row.get("top_examples") or []),
            "map": None if amap is None else {
                "mean_positive": amap.get("mean_positive"),
                "mean_negative": amap.get("mean_negative"),
                "top_tokens": (amap.get("top_tokens") or [])[:TOP_TOKENS]},
            "maps": mapped(maps, (row["layer"], row["latent"]))}


def describe_examples(rows: list[dict[str, Any]], shown: int = 3) -> str | None:
    """A one-line description of a latent from its top-activating examples, by template and
    with no model: the tokens it peaks on (with how many of the examples; "N different tokens"
    when none repeats), and the context of the strongest one (up to 4 tokens before the peak).
    When at least half the examples sit within the first EARLY positions of their reference
    sequence, it says so first: such a latent tracks the position more than the text."""
    peaks = [(ex.get("tokens") or [], ex.get("max_index"), ex.get("position")) for ex in rows]
    peaks = [p for p in peaks if isinstance(p[1], int) and 0 <= p[1] < len(p[0])]
    if not peaks:
        return None
    counts: dict[str, int] = {}
    for toks, i, _ in peaks:
        counts[toks[i]] = counts.get(toks[i], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:shown]
    n = len(peaks)
    if top[0][1] == 1 and n > 1:
        text = f"peaks on {n} different tokens, e.g. " + ", ".join(f"“{visible(t)}”"
                                                                   for t, _ in top)
    else:
        text = "peaks on " + ", ".join(f"“{visible(t)}” ({k} of {n})" for t, k in top)
    toks, i, _ = peaks[0]
    text += f"; strongest in “…{visible(''.join(toks[max(0, i - 4):i]))}[{visible(toks[i])}]”."
    early = [p for _, _, p in peaks if isinstance(p, int) and p < EARLY]
    if 2 * len(early) >= n:
        return (f"Fires early in its sequence ({len(early)} of {n} examples at positions "
                f"{min(early)}–{max(early)}); {text}")
    return text[0].upper() + text[1:]


def output_effect(e: dict | None) -> dict[str, Any] | None:
    """The output effect's token lists, each cut to TOP_TOKENS, with how it was read."""
    if not e:
        return None
    lists = {f"{edit}_{way}": ((e.get(edit) or {}).get(way) or [])[:TOP_TOKENS]
             for edit in ("added", "ablated") for way in ("rises", "falls")}
    return {**lists, "strength": e.get("strength"), "alpha": e.get("alpha"),
            "completions": len(e.get("completions") or []), "positions": e.get("positions")}


def density(d: dict | None, edges: list[float]) -> dict[str, Any] | None:
    if not d:
        return None
    counts = d.get("histogram") or []
    top = max(counts, default=0)
    bars = [{"height": round(100 * c / top, 1) if top else 0.0,
             "title": (f"[{edges[n]:.3g}, {edges[n + 1]:.3g}): {c}" if n + 1 < len(edges)
                       else str(c))} for n, c in enumerate(counts)]
    return {"frequency": d.get("frequency"), "fired": d.get("fired"), "tokens": d.get("tokens"),
            "bars": bars, "low": edges[0] if edges else None, "high": edges[-1] if edges else None}


def examples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first top-activating examples, each a list of highlighted token spans."""
    shown = rows[:EXAMPLES_SHOWN]
    scale = highlight.scale_of([ex.get("activations") or [] for ex in shown])
    return [{"activation": ex.get("activation"), "sequence": ex.get("sequence"),
             "spans": highlight.spans(ex.get("tokens") or [], ex.get("activations") or [],
                                      scale, palette=(highlight.ORANGE, highlight.BLUE),
                                      mark=ex.get("max_index"), label="activation")}
            for ex in shown]


def mapped(maps: dict | None, key: tuple[int, int]) -> list[dict[str, Any]]:
    """The mapped completions with the largest |δ_i(C)| of one latent, highlighted by δ_{i,t}."""
    if not maps or key not in maps["columns"]:
        return []
    c = maps["columns"][key]
    rows = sorted(maps["rows"], key=lambda r: -abs(r["delta"][c]))[:MAPS_SHOWN]
    values = [maps["delta"][r["offset"]:r["offset"] + r["n_tokens"], c].tolist() for r in rows]
    scale = highlight.scale_of(values)
    return [{"label": r.get("label"), "line": r.get("line"), "prompt_id": r.get("prompt_id"),
             "delta": r["delta"][c], "loss": r.get("loss"),
             "spans": highlight.spans(r["tokens"], v, scale, prompt=r.get("n_prompt_tokens", 0))}
            for r, v in zip(rows, values, strict=True)]
