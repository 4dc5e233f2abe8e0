"""The HTML report of a run: one self-contained page that opens offline.

1. Read each stage's files into a plain dict, section by section
   (:mod:`latentaudit.report.sections`): the attribution run (required: ``manifest.json``,
   ``ranking.jsonl``, ``attribution.safetensors``), then, when they exist, the explain stage's
   ``explain/`` folder, the circuit's ``circuit.json`` (``circuit/``), the steering sweep's files
   the monitor evaluation's ``monitor_eval.json`` (``monitor-eval/``) and, given other runs
   (``--with``), their rankings and sweeps for the across-behaviours comparison. A stage
   without files leaves its section out. Last, the findings
   (:mod:`latentaudit.report.findings`), computed from those files, shown first and written
   to ``RUN_DIR/findings.json``.
2. Draw the figures with matplotlib (Δ-attribution against Δ-activation of every latent;
   exact against first-order Δ; the ROC curves when the monitor evaluation has no ``roc.png``)
   and inline them, with the sweep's and the monitor evaluation's own PNG figures, as ``data:``
   URIs (:mod:`latentaudit.report.figures`); per-token highlight intensity is an inline style
   computed in Python (:mod:`latentaudit.report.highlight`). The circuit graph is an inline SVG
   laid out in Python (:mod:`latentaudit.report.sections.circuit`).
3. Merge the sections into the ranked-latents table and one drill-down per latent
   (:mod:`latentaudit.report.context`).
4. Render with jinja2, autoescape on (:mod:`latentaudit.report.render`): all model and corpus
   text is escaped, content warnings stand where corpus text does, and a Content-Security-Policy
   lets the page's one inline script run and nothing load from anywhere.
5. Write ``RUN_DIR/report.html`` (or ``out``) atomically.

In the page, ``#sort=KEY`` (``:asc`` / ``:desc``) sorts the ranked-latents table,
``#latent-ID`` opens a latent's details (``#latent-LAYER-ID`` when the run has several layers) and
``#cnode-LAYER-ID`` selects a node of the circuit graph.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL = 'pip install "latentaudit[report]"'
REPORT_FILE = "report.html"
FINDINGS_FILE = "findings.json"


def require_packages() -> None:
    """Raise one clear error when jinja2 or matplotlib is missing."""
    from latentaudit.errors import require

    for module in ("jinja2", "matplotlib"):
        require(module, INSTALL, "The HTML report")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 explain: str | os.PathLike | None = None,
                 steering: str | os.PathLike | None = None,
                 monitor: str | os.PathLike | None = None,
                 circuit: str | os.PathLike | None = None,
                 with_runs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write the report of the run in ``run_dir`` to ``out`` (default ``run_dir/report.html``)
    and return its path. ``explain`` is the explain stage's folder (default ``run_dir/explain``),
    ``steering`` the folder of the steering sweep's files (default ``run_dir``), ``monitor`` the
    folder of ``latentaudit monitor evaluate`` (default ``run_dir/monitor-eval``), ``circuit``
    the folder of ``latentaudit circuit`` (default ``run_dir/circuit``); ``with_runs`` are run
    folders of other behaviours on the same model and SAE, compared in the section "Shared
    latents across behaviours"."""
    from latentaudit._io import atomic_open, write_json
    from latentaudit.report.context import build_context
    from latentaudit.report.render import render
    from latentaudit.report.sections import Sources

    require_packages()
    run = Path(run_dir)
    sources = Sources(run=run, explain=Path(explain) if explain else run / "explain",
                      steering=Path(steering) if steering else run,
                      monitor=Path(monitor) if monitor else run / "monitor-eval",
                      circuit=Path(circuit) if circuit else run / "circuit",
                      others=tuple(Path(p) for p in with_runs))
    context = build_context(sources)
    html = render(context)
    path = Path(out) if out else run / REPORT_FILE
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(html)
    if context.get("findings"):
        write_json(run / FINDINGS_FILE, context["findings"]["findings"])
    else:  # a findings.json of files that are gone would contradict the page
        (run / FINDINGS_FILE).unlink(missing_ok=True)
    log.info("wrote %s (%d latents; sections: %s)", path, len(context["latents"]),
             ", ".join(s["name"] for s in context["sections"]))
    return path


def write_findings(run_dir: str | os.PathLike, *, explain: str | os.PathLike | None = None,
                   steering: str | os.PathLike | None = None) -> tuple[Path, dict | None]:
    """Compute the run's findings (:mod:`latentaudit.report.findings`), write them to
    ``run_dir/findings.json`` and return (that path, the findings); None, and no file, when the
    run has neither steering nor an exactness check. Needs neither jinja2 nor matplotlib."""
    from latentaudit._io import write_json
    from latentaudit.report.sections import findings

    run = Path(run_dir)
    if not run.is_dir():
        from latentaudit.errors import LatentAuditError

        raise LatentAuditError(f"{run}: no such run folder; pass the --out folder of a "
                               "`latentaudit attribute` or `latentaudit run`.")
    data = findings.load(run, Path(explain) if explain else run / "explain",
                         Path(steering) if steering else run)
    path = run / FINDINGS_FILE
    if data is not None:
        write_json(path, data["findings"])
    else:
        path.unlink(missing_ok=True)
    return path, data and data["findings"]


__all__ = ["FINDINGS_FILE", "REPORT_FILE", "write_findings", "write_report"]
