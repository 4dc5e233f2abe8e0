"""Compare the candidate default SAEs of `qwen2.5-0.5b-instruct` from their run folders.

    python evals/default-sae/compare.py            # prints the table, writes comparison.json/.md

1. Reconstruction: FVU (held-out split and outside books), never-firing latents and the CE-loss
   increase, as ``latentaudit sae evaluate`` recorded them in each shipped SAE's ``cfg.json``.
2. Agreement of the first-order Δ with exact mean ablation, from ``explain/exact.json`` (exact
   Δℓ_i(C) per completion) and ``explain/completions.jsonl`` (first-order δ_i(C) of the same
   completions, the per-token maps summed): per pair, Δ_i = Δℓ_i(C+) − Δℓ_i(C−) exact and first
   order, their Spearman ρ over the checked latents (mean and min over pairs) and the sign
   flips over pairs × latents (large: exact |Δ| ≥ 10% of the pair's largest); and the run's own
   ρ of the pair-mean Δ with its Fisher-z interval and flips (``findings.json`` ``trust``). The
   pair means recomputed here must equal exact.json's: the two files are read in one order.
3. Steering away (``steering_summary.json``): per method, the mean paired change of the
   behaviour rate over its latents with its bootstrap interval and the latents beyond the
   random band; ``findings.json``'s comparison of attribution against random and Δ-activation
   (difference of means over latents, beat / worse / no clear difference) and its verdicts on
   the attribution and the Δ-activation latents.
4. A readability proxy, not a reading of the latents: of the top 10 latents of the ranking
   (``explain/latents.jsonl``), how many fire on the run's own text (any top-activating
   example; a latent that never fires can still rank high, since δ reads the residual's
   projection on its direction, not its activation) and on at least 10 of its tokens (a full
   set of examples to read), their median firing frequency, and how many fire on more than 10%
   of its tokens (dense latents are rarely readable). The report's template description is
   made from the examples, so a latent that fires is one that gets a description.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parents[1] / "src" / "latentaudit" / "saes" / "shipped"
CANDIDATES = {"l12-8k": "qwen2.5-0.5b-instruct", "l12-4k": "qwen2.5-0.5b-instruct-l12-4k",
              "l6-8k": "qwen2.5-0.5b-instruct-l6"}
"""Run name → shipped SAE folder; l12-8k is the current default."""
READ_TOP = 10
DENSE = 0.10
EXAMPLES = 10
"""Top-activating examples the runs keep per latent ([explain] examples)."""
LARGE = 0.10
"""A sign flip counts as large when the exact |Δ| is at least this share of its pair's largest."""
METHODS = ("attribution", "activation", "random")
VERDICTS = ("supported", "contradicted", "inconclusive")


def jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def ranks(x: list[float]) -> list[float]:
    """Ranks 1..n (ascending), ties sharing the mean of their ranks."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the average ranks (nan when either side is constant)."""
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else float("nan")


def reconstruction(sae: str) -> dict:
    """Step 1 from the shipped SAE's cfg.json."""
    cfg = json.loads((SHIPPED / sae / "cfg.json").read_text(encoding="utf-8"))
    res = cfg["evaluation"]["results"]
    return {"sae": sae, "layer": cfg["layer"], "d_sae": cfg["d_sae"], "k": cfg["k"],
            "fvu_held_out": res["held-out"]["fvu"], "fvu_outside": res["outside"]["fvu"],
            "never_firing_held_out": res["held-out"]["dead_fraction"],
            "ce_increase_pct": cfg["training"]["metrics"]["ce_increase_pct"]}


def exactness(run: Path) -> dict:
    """Step 2: per-pair ρ and sign flips, and the run's ρ of the pair means."""
    exact = json.loads((run / "explain" / "exact.json").read_text(encoding="utf-8"))
    (layer, e), = exact["layers"].items()
    manifest = json.loads((run / "explain" / "manifest.json").read_text(encoding="utf-8"))
    columns = [c["latent"] for c in manifest["map_columns"] if str(c["layer"]) == layer]
    col = [columns.index(i) for i in e["latents"]]
    first = {r["line"]: [r["delta"][c] for c in col]
             for r in jsonl(run / "explain" / "completions.jsonl")}
    change = dict(zip(e["completions"], e["exact_loss_change"], strict=True))
    per_pair, flips, large, firsts = [], 0, 0, []
    for pos, neg in e["pairs"]:
        ex = [a - b for a, b in zip(change[pos], change[neg], strict=True)]
        fo = [a - b for a, b in zip(first[pos], first[neg], strict=True)]
        per_pair.append(spearman(ex, fo))
        flips += sum(a * b < 0 for a, b in zip(ex, fo, strict=True))
        top = max(abs(a) for a in ex)
        large += sum(a * b < 0 and abs(a) >= LARGE * top for a, b in zip(ex, fo, strict=True))
        firsts.append(fo)
    mean_first = [statistics.fmean(v) for v in zip(*firsts, strict=True)]
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
               for a, b in zip(mean_first, e["first_order_delta"], strict=True)), run
    trust = json.loads((run / "findings.json").read_text(encoding="utf-8"))["trust"][0]
    return {"layer": int(layer), "latents": len(e["latents"]), "pairs": len(e["pairs"]),
            "pair_lines": e["pairs"], "rho_per_pair": per_pair,
            "rho_pair_mean": statistics.fmean(per_pair),
            "rho_pair_min": min(per_pair), "sign_flips_per_pair": flips,
            "large_sign_flips_per_pair": large,
            "checks_per_pair": len(e["pairs"]) * len(e["latents"]),
            "rho_of_means": e["spearman"], "rho_of_means_ci": trust["ci"],
            "sign_flips_of_means": trust["sign_flips"]}


def steering(run: Path) -> dict:
    """Step 3 from steering_summary.json and findings.json."""
    summary = json.loads((run / "steering_summary.json").read_text(encoding="utf-8"))
    by = {r["method"]: r for r in summary["summary"] if r["direction"] == "away"}
    found = json.loads((run / "findings.json").read_text(encoding="utf-8"))
    vs = {m["baseline"]: m for m in found["methods"]
          if m["method"] == "attribution" and m["direction"] == "away"}
    one = jsonl(run / "steering.jsonl")[0]  # every row holds the units and the unsteered rate
    return {"methods": {m: {"latents": by[m]["latents"], "mean_diff": by[m]["mean_diff"],
                            "mean_diff_ci": by[m]["mean_diff_ci"],
                            "beyond_null": by[m]["beyond_null"],
                            "mean_incoherence": by[m]["mean_incoherence"]}
                        for m in METHODS},
            "attribution_vs": {b: {k: vs[b][k] for k in ("difference", "se", "detectable",
                                                          "result")}
                               for b in ("random", "activation")},
            "verdicts": {m: {v: sum(x["method"] == m and x["verdict"] == v
                                    for x in found["latents"]) for v in VERDICTS}
                         for m in ("attribution", "activation")},
            "units": one["n"], "base_rate": one["base_rate"]}


def readability(run: Path) -> dict:
    """Step 4: the proxy over the top READ_TOP latents of the ranking."""
    rows = sorted(jsonl(run / "explain" / "latents.jsonl"), key=lambda r: r["final_rank"])
    rows = rows[:READ_TOP]
    freq = [r["density"]["frequency"] for r in rows]
    return {"latents": len(rows), "fire": sum(bool(r["top_examples"]) for r in rows),
            "full": sum(len(r["top_examples"]) >= EXAMPLES for r in rows),
            "median_frequency": statistics.median(freq), "dense": sum(f > DENSE for f in freq),
            "corpus_tokens": rows[0]["density"]["tokens"]}


def stage_seconds(run: Path) -> dict:
    """Seconds per stage that ran, from pipeline.json."""
    stages = json.loads((run / "pipeline.json").read_text(encoding="utf-8"))["stages"]
    return {k: round(v["seconds"]) for k, v in stages.items() if v["status"] == "done"}


def compare(runs: Path = HERE / "runs") -> dict:
    """Every candidate whose run folder has finished."""
    out = {}
    for name, sae in CANDIDATES.items():
        run = runs / name
        if not (run / "findings.json").is_file():
            continue
        out[name] = {"reconstruction": reconstruction(sae), "exactness": exactness(run),
                     "steering": steering(run), "readability": readability(run),
                     "seconds": stage_seconds(run)}
    return out


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def _ci(ci: list[float]) -> str:
    return f"[{_pp(ci[0])}, {_pp(ci[1])}]"


def table(result: dict) -> str:
    """The markdown table of the comparison (steering: mean paired change of the behaviour rate
    away, in percentage points, over each method's latents)."""
    head = ("| candidate | FVU held-out / outside | ρ per pair: mean (min) | sign flips per pair "
            "| ρ of pair means [95% CI] | attribution, pp [CI] | activation, pp [CI] "
            "| random, pp [CI] | attribution vs random / activation "
            "| supported: attribution / activation "
            "| top 10: fire / ≥ 10 examples / dense, median freq |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for name, r in result.items():
        rec, ex, st, rd = (r[k] for k in ("reconstruction", "exactness", "steering",
                                            "readability"))
        m, v, ci = st["methods"], st["verdicts"], ex["rho_of_means_ci"]
        cells = [f"{name} (`{rec['sae']}`)",
                 f"{rec['fvu_held_out']:.3f} / {rec['fvu_outside']:.3f}",
                 f"{ex['rho_pair_mean']:.2f} ({ex['rho_pair_min']:.2f})",
                 f"{ex['sign_flips_per_pair']} of {ex['checks_per_pair']} "
                 f"({ex['large_sign_flips_per_pair']} large)",
                 f"{ex['rho_of_means']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""),
                 *(f"{_pp(m[k]['mean_diff'])} {_ci(m[k]['mean_diff_ci'])}" for k in METHODS),
                 " / ".join(st["attribution_vs"][b]["result"] for b in ("random", "activation")),
                 " / ".join(f"{v[k]['supported']} of {m[k]['latents']}" for k in METHODS[:2]),
                 f"{rd['fire']} / {rd['full']} / {rd['dense']}, "
                 f"{100 * rd['median_frequency']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    runs = Path(argv[0]) if argv else HERE / "runs"
    result = compare(runs)
    if not result:
        sys.stderr.write(f"no finished run under {runs}\n")
        return 1
    (HERE / "comparison.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = table(result)
    (HERE / "comparison.md").write_text(md, encoding="utf-8")
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
