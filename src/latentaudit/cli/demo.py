"""``latentaudit demo``: the whole method on the embedded default model, in minutes on a CPU."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "Run the shipped demo (default model and SAE, false-belief, offline judge) and print " \
       "where the report is."
DESCRIPTION = (
    "`latentaudit run` with the shipped config: the embedded default model and its SAE, 8 "
    "shipped on-policy completions for each of the first false-belief prompts graded by the "
    "default offline judge, then attribution, explanation and a small steering check. Sized to "
    "finish in under 20 minutes on a 2-core CPU; rerunning resumes or skips what is done.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="Run folder.")
    p.add_argument("--dry-run", action="store_true",
                   help="Check the inputs and show what each stage would do, then stop.")
    p.add_argument("--show-config", action="store_true",
                   help="Print the shipped config (a starting point for your own: save it and "
                        "`latentaudit run` it from any folder) and stop.")


def run(args: argparse.Namespace) -> int:
    from latentaudit.cli.run import plan_lines, stop_on_sigterm, summary_lines
    from latentaudit.pipeline import run_demo
    from latentaudit.pipeline.demo import show_config

    if args.show_config:
        print(show_config(), end="")
        return 0
    stop_on_sigterm()
    result = run_demo(args.out, dry_run=args.dry_run)
    for line in plan_lines(result) if args.dry_run else summary_lines(result):
        print(line)
    return 0
