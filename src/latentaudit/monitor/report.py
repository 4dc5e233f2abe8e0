"""Writing an evaluation: the AUC table (Markdown), the full results (JSON), one row per latent
(JSONL) and the ROC curves (PNG + SVG, when matplotlib is installed).

Random latent sets are summarised over their draws: the mean combination AUC with the range
over draws (not a bootstrap interval), and the median single-latent AUC over every drawn latent.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from latentaudit._io import atomic_open, atomic_path, write_json, write_jsonl

log = logging.getLogger(__name__)

RESULTS_FILE = "monitor_eval.json"
TABLE_FILE = "auc_table.md"
LATENTS_FILE = "latents.jsonl"
FIGURE = "roc"
MODES = {"cv": "prompt-held-out CV on the evaluation file",
         "transfer": "fit on the training file, scored on the evaluation file"}


def _f(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _auc(r: dict[str, Any]) -> str:
    return f"{_f(r['auc'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]"


def groups(sets: list[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(method, K, results) in first-seen order; random draws of one K together."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in sets:
        out.setdefault((s["method"], s["k"]), []).append(s)
    return [(m, k, rs) for (m, k), rs in out.items()]


def _row(method: str, k: int, rs: list[dict[str, Any]], modes: list[str]) -> str:
    if method == "random":
        lat = [r for s in rs for r in s["per_latent"]]
        fire = statistics.mean(sum(r["fires"] > 0 for r in s["per_latent"]) for s in rs)
        cells = [f"random ({len(rs)} draws)", str(k), f"{fire:.1f}", "–", "–",
                 f"{_f(statistics.median(r['mean']['auc'] for r in lat))} / "
                 f"{_f(statistics.median(r['max']['auc'] for r in lat))}"]
        for mode in modes:
            aucs = [s["combination"][mode]["auc"] for s in rs]
            prec = [s["combination"][mode]["precision"] for s in rs]
            cells += [f"{_f(statistics.mean(aucs))} (draws {_f(min(aucs))}–{_f(max(aucs))})",
                      _f(statistics.mean(prec))]
        return "| " + " | ".join(cells) + " |"
    s = rs[0]
    first = s["per_latent"][0]
    cells = [f"{method} top-{k}" if method != "given" else "given latents", str(k),
             str(sum(r["fires"] > 0 for r in s["per_latent"])),
             f"{sum(r['mean']['ci_low'] > 0.5 for r in s['per_latent'])} / "
             f"{sum(r['mean']['ci_high'] < 0.5 for r in s['per_latent'])}",
             f"{first['latent']}: {_auc(first['mean'])}",
             f"{_f(s['median_auc_mean'])} / {_f(s['median_auc_max'])}"]
    for mode in modes:
        c = s["combination"][mode]
        cells += [_auc(c), _f(c["precision"])]
    return "| " + " | ".join(cells) + " |"


def table(results: dict[str, Any]) -> str:
    """The Markdown AUC table."""
    cfg, c = results["config"], results["counts"]
    modes = [m for m in MODES if m in results["probe"]]
    head = ["latents", "K", "latents active on ≥ 1 completion",
            "latents whose AUC interval lies above / below ½",
            "rank-1 latent: AUC of its mean activation [CI]",
            "median latent AUC (mean / max act.)"]
    for mode in modes:
        label = "CV" if mode == "cv" else "fit on training file"
        head += [f"combination AUC, {label} [{cfg['level']:.0%} CI]",
                 f"precision @ recall {cfg['recall']:g} ({label})"]
    lines = [f"Evaluation file {c['path']}: {c['completions']} completions of {c['prompts']} "
             f"prompts ({c['positive']} positive, {c['negative']} negative, {c['excluded']} "
             f"excluded; a detector that flags everything has precision "
             f"{c['positive'] / c['completions']:.2f}). Model {results['model']}, layer "
             f"{results['layer']}, SAE {results['sae']['path']}."]
    if results.get("train_counts"):
        t = results["train_counts"]
        lines.append(f"Training file {t['path']}: {t['completions']} completions of "
                     f"{t['prompts']} prompts ({t['positive']} positive, {t['negative']} "
                     "negative).")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(m, k, rs, modes) for m, k, rs in groups(results["sets"])]
    probe = ["residual probe (mean residual)", str(results["d_model"]), "–", "–", "–", "–"]
    for mode in modes:
        probe += [_auc(results["probe"][mode]), _f(results["probe"][mode]["precision"])]
    lines.append("| " + " | ".join(probe) + " |")
    lines += ["", "A latent is active on a completion when it fires on at least one of its tokens. "
              "Intervals: percentile bootstrap over prompts "
              f"({cfg['bootstrap']} resamples). Combinations: logistic regression on the K "
              "latents' mean activations, λ chosen by inner prompt-held-out CV. "
              + "; ".join(f"{m}: {MODES[m]}" for m in modes) + "."]
    return "\n".join(lines) + "\n"


def latent_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per latent of every non-random set."""
    return [{"method": s["method"], "k": s["k"], **r} for s in results["sets"]
            if s["method"] != "random" for r in s["per_latent"]]


def write_evaluation(out: str | Path, results: dict[str, Any]) -> list[Path]:
    """Write the files into ``out``; returns what was written."""
    out = Path(out)
    write_json(out / RESULTS_FILE, results)
    with atomic_open(out / TABLE_FILE, "w", encoding="utf-8") as f:
        f.write(table(results))
    write_jsonl(out / LATENTS_FILE, latent_rows(results))
    written = [out / RESULTS_FILE, out / TABLE_FILE, out / LATENTS_FILE]
    return written + roc_figure(out, results)


def _curves(results: dict[str, Any], k: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, combination) of each set of size k to draw; random: the median-AUC draw."""
    out = []
    for method, kk, rs in groups(results["sets"]):
        if kk != k:
            continue
        if method == "random":
            rs = sorted(rs, key=lambda s: s["combination"]["cv"]["auc"])
            out.append((f"random {k} (median draw)", rs[len(rs) // 2]["combination"]))
        else:
            out.append((f"{method} top-{k}" if method != "given" else "given latents",
                        rs[0]["combination"]))
    return out + [("residual probe", results["probe"])]


def roc_plot(results: dict[str, Any]):
    """The ROC curves as a matplotlib ``Figure``, one panel per K (solid: CV; dashed: fit on
    the training file). No pyplot: no global state, no GUI backend. Needs matplotlib."""
    from matplotlib.figure import Figure

    ks = sorted({s["k"] for s in results["sets"]})
    fig = Figure(figsize=(4.2 * len(ks), 4.2))
    axes = fig.subplots(1, len(ks), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        for n, (label, combo) in enumerate(_curves(results, k)):
            for mode, style in (("cv", "-"), ("transfer", "--")):
                if mode in combo:
                    ax.plot(combo[mode]["roc"]["fpr"], combo[mode]["roc"]["tpr"], style,
                            color=f"C{n}", label=f"{label} ({mode}, AUC "
                                                 f"{combo[mode]['auc']:.2f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"K = {k}",
               xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def roc_figure(out: Path, results: dict[str, Any]) -> list[Path]:
    """Write :func:`roc_plot` as ``roc.png`` and ``roc.svg``; nothing without matplotlib."""
    try:
        fig = roc_plot(results)
    except ImportError:
        log.warning("matplotlib is not installed: no ROC figure (pip install "
                    "'latentaudit[report]')")
        return []
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{FIGURE}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        paths.append(path)
    return paths

