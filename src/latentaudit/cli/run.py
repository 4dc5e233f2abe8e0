"""``latentaudit run CONFIG``: every stage of the method into one run folder, resumable."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "Run every stage (sample → judge → pair → attribute → explain → circuit → steer → " \
       "report) from a TOML or YAML config, skipping finished stages and resuming an " \
       "interrupted one."
DESCRIPTION = (
    "Run the stages a config names into one run folder: sample → judge → pair → attribute → "
    "explain → circuit (with a [circuit] section) → steer → report. Each stage is fingerprinted "
    "(its options, the stages it reads, the files it reads) in RUN/pipeline.json: a finished "
    "stage whose fingerprint is unchanged is skipped, an interrupted one resumes, and a changed "
    "one reruns with every stage that reads it. Every input is checked before any model loads.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentaudit.pipeline.stages import ORDER

    p.add_argument("config", metavar="CONFIG", help="Run config (.toml, .yaml or .yml).")
    p.add_argument("--out", help="Run folder (default: the config's out, relative to the "
                                 "config file).")
    p.add_argument("--redo", nargs="+", default=[], choices=ORDER, metavar="STAGE",
                   help="Run these stages again from the start, with every stage that reads "
                        f"them ({', '.join(ORDER)}).")
    p.add_argument("--dry-run", action="store_true",
                   help="Check the config and every input, show what each stage would do, stop.")


def stop_on_sigterm() -> None:
    """Let SIGTERM (a scheduler or `kill`) end the run as Ctrl-C does: the stage in flight is
    recorded as partial and the run folder's lock is released, so a rerun resumes at once."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    from latentaudit.pipeline import run_pipeline

    stop_on_sigterm()
    result = run_pipeline(args.config, out=args.out, redo=tuple(args.redo),
                          dry_run=args.dry_run)
    for line in plan_lines(result) if args.dry_run else summary_lines(result):
        print(line)
    return 0


def plan_lines(result) -> list[str]:
    return [f"{p.name:<10} {p.action:<7} {p.why}" for p in result.plans]


def _what_it_did(name: str, rec) -> str:
    """The one-line account of a finished stage the report's pipeline section gives."""
    from dataclasses import asdict

    from latentaudit.report.sections.pipeline import describe

    return describe(name, asdict(rec))


def summary_lines(result) -> list[str]:
    """One line per stage (what happened, its time), the notes and where the results are."""
    lines = [f"{'stage':<10} {'status':<8} {'seconds':>8}  {'this run':<7} note"]
    for p in result.plans:
        rec = result.record.stages.get(p.name)
        status = rec.status if rec is not None else "-"
        seconds = f"{rec.seconds:.0f}" if rec is not None and rec.seconds else "-"
        note = rec.reason if rec is not None and rec.reason else p.why
        if rec is not None and rec.status == "done" and p.action == "run":
            note = _what_it_did(p.name, rec) or "ran in this run"
        lines.append(f"{p.name:<10} {status:<8} {seconds:>8}  {p.action:<7} {note}")
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"\nrun folder: {result.run} (pipeline.json records every stage)")
    lines.append(f"report: {result.report}" if result.report else
                 "no HTML report in this version: read ranking.jsonl, explain/latents.jsonl and "
                 "steering_summary.json in the run folder")
    return lines
