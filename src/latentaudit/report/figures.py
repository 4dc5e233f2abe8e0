"""The report's figures, drawn with matplotlib (Agg, a ``Figure`` per plot, no pyplot state) and
inlined as ``data:image/png;base64`` URIs, so the page fetches nothing.

1. Δ-attribution against Δ-activation for every latent of a layer (grey), the ranked latents in
   colour and the top few labelled with their ids; the Spearman ρ of the two scores over all
   latents in the title (how much the ranking differs from ranking by activation).
2. Exact against first-order Δ of the latents of the exactness check (explain's exact.json),
   with the y = x line and its Spearman ρ.
3. Existing PNG files (the steering sweep's figures, a monitor evaluation's ``roc.png``) are
   inlined as they are.
4. The ROC curves of a monitor evaluation without its ``roc.png``, drawn from the ROC points of
   ``monitor_eval.json`` by the monitor stage's own :func:`~latentaudit.monitor.report.roc_plot`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LABELLED = 5
"""Ranked latents labelled with their id in the scatter."""


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def file_uri(path: Path) -> str | None:
    """A PNG file as a data URI (None when it is missing or not a PNG)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    return png_uri(data) if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return png_uri(buf.getvalue())


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman ρ of finite pairs (average ranks for ties); None with fewer than 3 or no spread."""
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return None
    rx, ry = _ranks(x[keep]), _ranks(y[keep])
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def attribution_scatter(attribution: np.ndarray, activation: np.ndarray,
                        ranked: Sequence[int], layer: int) -> str:
    """Figure 1 for one layer, as a data URI."""
    fig = _figure(5.6, 4.2)
    ax = fig.subplots()
    ax.scatter(activation, attribution, s=3, c="0.72", linewidths=0, rasterized=True,
               label=f"all {len(attribution)} latents")
    top = np.asarray(list(ranked), dtype=int)
    if len(top):
        ax.scatter(activation[top], attribution[top], s=12, c="#d62728", linewidths=0,
                   label=f"ranked ({len(top)})")
        for i in top[:LABELLED]:
            ax.annotate(str(int(i)), (activation[i], attribution[i]), fontsize=7,
                        xytext=(3, 2), textcoords="offset points")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.axvline(0, color="0.5", lw=0.6)
    ax.set_xlabel("Δ-activation (positive − negative mean activation)")
    ax.set_ylabel("Δ-attribution")
    rho = spearman(attribution, activation)
    ax.set_title(f"layer {layer}" + ("" if rho is None else f": Spearman ρ = {rho:.2f}"),
                 fontsize=10)
    ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    return _uri(fig)


def exactness_scatter(first_order: Sequence[float], exact: Sequence[float], latents: Sequence[int],
                      layer: int, rho: float | None) -> str:
    """Figure 2 for one layer, as a data URI."""
    x = np.asarray(first_order, dtype=float)
    y = np.asarray(exact, dtype=float)
    fig = _figure(4.4, 4.0)
    ax = fig.subplots()
    ax.scatter(x, y, s=16, c="#1f77b4")
    for xi, yi, i in list(zip(x, y, latents, strict=True))[:LABELLED]:
        ax.annotate(str(int(i)), (xi, yi), fontsize=7, xytext=(3, 2), textcoords="offset points")
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    if len(finite):
        lo, hi = float(finite.min()), float(finite.max())
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="y = x")
        ax.legend(fontsize=7, frameon=False)
    ax.set_xlabel("first-order Δ (attribution)")
    ax.set_ylabel("exact Δ (mean ablation)")
    ax.set_title(f"layer {layer}" + ("" if rho is None else f": Spearman ρ = {rho:.2f}"),
                 fontsize=10)
    fig.tight_layout()
    return _uri(fig)


def roc_curves(results: dict) -> str:
    """Figure 4, as a data URI."""
    from latentaudit.monitor.report import roc_plot

    return _uri(roc_plot(results))
