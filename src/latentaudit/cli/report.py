"""``latentaudit report``: one self-contained HTML page of a run (attribution, explain, steer,
monitor)."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = ("Write a self-contained HTML report of a run (ranked latents, explanations, steering, "
        "monitors).")
DESCRIPTION = (
    "Write one HTML file that opens offline (inline CSS, script and figures, nothing fetched): "
    "the run's summary and provenance, the ranked latents with their logit lens, Δ-attribution "
    "against Δ-activation for every latent, the exactness ρ, and per latent a drill-down with "
    "its top-activating examples and per-token attribution maps as highlight intensity and, when "
    "the run was steered, its steering table and example completions; when its latents were "
    "evaluated as monitors, the AUC table with its intervals and the ROC curves, and each "
    "latent's AUC; when `latentaudit circuit` ran, its graph (click a node for its edges, logit "
    "lens and examples). Sections whose files are "
    "missing are left out. All model and corpus text is escaped. Needs "
    "`pip install \"latentaudit[report]\"`.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="Run folder of `latentaudit attribute` (its "
                                                  "--out).")
    p.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html).")
    p.add_argument("--explain", metavar="DIR", help="Folder of `latentaudit explain` (default "
                                                    "RUN_DIR/explain).")
    p.add_argument("--steering", metavar="DIR", help="Folder of `latentaudit steer` files, its "
                                                     "--out (default RUN_DIR).")
    p.add_argument("--monitor", metavar="DIR", help="Folder of `latentaudit monitor evaluate`, "
                                                    "its --out (default RUN_DIR/monitor-eval).")
    p.add_argument("--summary", action="store_true",
                   help="Print the run's findings (verdict per steered latent, methods against "
                        "random latents, trust in the first-order Δ, disagreements) as text and "
                        "write RUN_DIR/findings.json, instead of the HTML page.")
    p.add_argument("--with", dest="with_runs", nargs="+", default=[], metavar="OTHER",
                   help="Run folders of other behaviours on the same model and SAE (or its "
                        "fine-tunes): the page adds their top-K overlap with this run against "
                        "chance and the latents high in several runs, with their steering "
                        "effect on each behaviour.")
    p.add_argument("--circuit", metavar="DIR", help="Folder of `latentaudit circuit`, its --out "
                                                    "(default RUN_DIR/circuit).")


def run(args: argparse.Namespace) -> int:
    from latentaudit.report import write_findings, write_report

    if args.summary:
        from latentaudit.report.sections.findings import summary_lines

        path, found = write_findings(args.run, explain=args.explain, steering=args.steering)
        if found is None:
            print("No findings yet: the run has neither a steering sweep nor an exactness "
                  "check (run `latentaudit steer` or `latentaudit explain`).")
            return 0
        print("\n".join(summary_lines(found)))
        print(f"(written to {path})")
        return 0

    path = write_report(args.run, args.out, explain=args.explain, steering=args.steering,
                        monitor=args.monitor, circuit=args.circuit,
                        with_runs=args.with_runs)
    print(path)
    return 0
