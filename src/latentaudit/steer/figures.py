"""Figures in the style of the method's post: per-latent steering effect per selection method.

One figure per direction (``steering_away`` / ``steering_toward``, PNG and SVG): for each
selection method a column of points, one per latent (its paired change in the behaviour rate),
the method's mean as a short black bar, and the random latents' range (the null band) as a grey
band; one panel per strength (or one for a searched sweep). Beside it, ``steering_{direction}_
sorted``: each method's per-latent effects sorted from the strongest in the steered direction,
one line per method over the random range, as the method's post draws them. Needs matplotlib
(``pip install "latentaudit[report]"``); without it the sweep writes no figure and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from latentaudit.runfolder import SteeringRow

log = logging.getLogger(__name__)
METHOD_ORDER = ("attribution", "activation", "model-diff", "given", "random")
LABELS = {"attribution": "Δ-attribution", "activation": "Δ-activation",
          "model-diff": "model diff", "given": "given", "random": "random"}


def plot_sweep(rows: Sequence[SteeringRow], out: Path) -> list[Path]:
    """Write the figures of a sweep's table into ``out``; returns the files written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no steering figures (pip install "
                    "\"latentaudit[report]\")")
        return []
    written = []
    single = [r for r in rows if len(r.latents) == 1 and r.diff is not None]
    for direction in ("away", "toward"):
        mine = [r for r in single if r.direction == direction]
        if not mine:
            continue
        panels = sorted({(r.model, None if r.searched else r.strength) for r in mine},
                        key=lambda x: (x[0], x[1] or 0))
        fig = Figure(figsize=(3.2 * len(panels) + 0.8, 3.6))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (model, strength) in zip(axes, panels, strict=True):
            _panel(ax, [r for r in mine if r.model == model
                        and (None if r.searched else r.strength) == strength])
            title = "searched strength" if strength is None else f"strength {strength:g}"
            ax.set_title(title + ("" if model == "main" else f" ({model} model)"), fontsize=9)
        axes[0].set_ylabel("change in behaviour rate (paired)")
        fig.suptitle(f"Steering {direction}", fontsize=11)
        written += _save(fig, out / f"steering_{direction}")
        fig = Figure(figsize=(3.2 * len(panels) + 0.8, 3.4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (model, strength) in zip(axes, panels, strict=True):
            _sorted_panel(ax, [r for r in mine if r.model == model
                               and (None if r.searched else r.strength) == strength], direction)
            title = "searched strength" if strength is None else f"strength {strength:g}"
            ax.set_title(title + ("" if model == "main" else f" ({model} model)"), fontsize=9)
        axes[0].set_ylabel("change in behaviour rate (paired)")
        axes[0].legend(fontsize=7, frameon=False)
        fig.suptitle(f"Steering {direction}: latents sorted by effect", fontsize=11)
        written += _save(fig, out / f"steering_{direction}_sorted")
    return written


def _save(fig, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def sorted_effects(rows: Sequence[SteeringRow], direction: str) -> dict[str, list[float]]:
    """{method: its latents' paired changes, strongest in the steered direction first}
    (away: most negative first; toward: most positive first)."""
    out: dict[str, list[float]] = {}
    for m in METHOD_ORDER:
        ys = [r.diff for r in rows if r.method == m and r.diff is not None]
        if ys:
            out[m] = sorted(ys, reverse=direction == "toward")
    return out


def _sorted_panel(ax, rows: Sequence[SteeringRow], direction: str) -> None:
    band = next((r.null_band for r in rows if r.null_band), None)
    if band:
        ax.axhspan(band[0], band[1], color="0.85", zorder=0, label="random range")
    ax.axhline(0, color="0.5", lw=0.8, zorder=1)
    for m, ys in sorted_effects(rows, direction).items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, lw=1.2, label=LABELS[m],
                ls="--" if m == "random" else "-", zorder=3)
    ax.set_xlabel("latent (sorted by effect)", fontsize=8)


def _panel(ax, rows: Sequence[SteeringRow]) -> None:
    methods = [m for m in METHOD_ORDER if any(r.method == m for r in rows)]
    band = next((r.null_band for r in rows if r.null_band), None)
    if band:
        ax.axhspan(band[0], band[1], color="0.85", zorder=0, label="random range")
    ax.axhline(0, color="0.5", lw=0.8, zorder=1)
    for x, m in enumerate(methods):
        ys = [r.diff for r in rows if r.method == m]
        jitter = [(i % 7 - 3) * 0.04 for i in range(len(ys))]
        ax.scatter([x + j for j in jitter], ys, s=14, alpha=0.8, zorder=3)
        ax.hlines(sum(ys) / len(ys), x - 0.3, x + 0.3, color="black", lw=2, zorder=4)
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=8)
    ax.set_xlim(-0.6, len(methods) - 0.4)
