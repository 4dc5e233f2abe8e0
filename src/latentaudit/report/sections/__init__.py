"""The report's sections: one loader and one template each, in page order.

A section is a :class:`Section`: ``load(sources)`` reads its files into a plain dict (or returns
None when the run has none of them, and the page leaves the section out) and ``template`` (under
``report/templates/``) shows that dict as ``section``. Besides what its own template reads, a
section's dict may hold two keys that the ranked-latents table and the per-latent drill-downs
gather from every section:

- ``columns``: ``[{key, label, title, kind, first}]``, extra columns of the ranked-latents table
  (``kind``: int, num, text, tokens, pct (a value ``{value, beyond}``), auc (a value
  ``{value, low, high}``), exact (a value ``{value, first_order, flip}``) or verdict;
  ``first``: the direction of a first click, asc or desc), and
  ``cells``: ``{(layer, latent): {key: value}}``.
- ``latents``: ``{(layer, latent): dict}``, shown in each latent's drill-down by the template
  ``latent_template``.

A new section is one more entry in :data:`SECTIONS`, one loader and one template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentaudit.report.sections import (
    across,
    attribution,
    circuit,
    explain,
    findings,
    monitor,
    pipeline,
    steering,
)


@dataclass(frozen=True)
class Sources:
    """Where the report reads each stage's files."""

    run: Path
    """The attribution run folder (``latentaudit attribute --out``)."""
    explain: Path
    """The explain stage's folder (default ``run/explain``)."""
    steering: Path
    """The folder of the steering sweep's files (default: the run folder)."""
    monitor: Path | None = None
    """The folder of ``latentaudit monitor evaluate`` (default ``run/monitor-eval``)."""
    circuit: Path | None = None
    """The folder of ``latentaudit circuit`` (default ``run/circuit``)."""
    others: tuple[Path, ...] = ()
    """Run folders of other behaviours on the same model and SAE (``report --with``)."""
    run_layers: list[int] | None = None
    """The layers of the run's manifest, once read."""
    run_latents: frozenset[tuple[int, int]] | None = None
    """(layer, latent) of the run's ranking, once read."""


@dataclass(frozen=True)
class Section:
    name: str
    """Key of the section's dict in the context, and its anchor in the page."""
    title: str
    template: str
    load: Callable[[Sources], dict[str, Any] | None]
    latent_template: str | None = None
    lead: bool = False
    """Loaded last (from the other stages' files), shown first."""


SECTIONS: tuple[Section, ...] = (
    Section("pipeline", "How this run was made", "pipeline.html",
            lambda s: pipeline.load(s.run)),
    Section("attribution", "Run and ranked latents", "attribution.html",
            lambda s: attribution.load(s.run), "attribution_latent.html"),
    Section("explain", "Explanations and exactness", "explain.html",
            lambda s: explain.load(s.explain), "explain_latent.html"),
    Section("circuit", "Circuit", "circuit.html",
            lambda s: circuit.load(s.circuit or s.run / "circuit", s.run_layers),
            "circuit_latent.html"),
    Section("steering", "Steering", "steering.html",
            lambda s: steering.load(s.steering, s.run_layers, s.run_latents),
            "steering_latent.html"),
    Section("across", "Shared latents across behaviours", "across.html",
            lambda s: across.load(s.run, list(s.others))),
    Section("monitor", "Monitors", "monitor.html",
            lambda s: monitor.load(s.monitor or s.run / "monitor-eval", s.run_layers,
                                   s.run_latents), "monitor_latent.html"),
    Section("findings", "Findings", "findings.html",
            lambda s: findings.load(s.run, s.explain, s.steering, s.run_layers),
            "findings_latent.html", lead=True),
)
