"""``latentaudit judge``: grade completions by a rubric (rules, LLM, local model or human)."""

from __future__ import annotations

import argparse
import os

NAME = "judge"
HELP = "Grade completions by a rubric with a rule, LLM, local-model or human judge."
DESCRIPTION = (
    "Grade every completion of COMPLETIONS (from `latentaudit sample`) by a rubric and write "
    "judged.jsonl. Verdicts are cached in the output folder (judge_cache.jsonl), so a rerun "
    "only grades what is missing or failed. Exits 1 when some completions could not be graded "
    "(they are listed and written with their error). Judges: rules | rules:RULES.json | "
    "openai:MODEL | local:MODEL | human:LABELS.csv (fill the file from --export-labels) | "
    "probe[:FILE] (a probe on a local model trained from labels by `latentaudit train-judge`; "
    "plain `probe` is the one shipped for the rubric).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentaudit.cli._engine import add_engine_options

    p.add_argument("--completions", help="Completions JSONL (from `latentaudit sample`).")
    p.add_argument("--rubric", help="Shipped rubric name (see --list-rubrics) or a rubric JSON "
                                    "file (an edited copy from --copy-rubric).")
    p.add_argument("--judge", default="auto",
                   help="rules[:FILE], openai:MODEL, local:MODEL, human:LABELS_FILE or "
                        "probe[:FILE]; auto (default): the rubric's shipped probe when it has "
                        "one, else its rules.")
    p.add_argument("--out", help="Output judged JSONL.")
    p.add_argument("--cache", help="Verdict cache (default: judge_cache.jsonl next to --out).")
    add_api_options(p)
    p.add_argument("--judge-model",
                   help="probe judge: the local model to read (default: the one it was "
                        "trained on), e.g. another folder holding the same model.")
    p.add_argument("--device", default="auto",
                   help="local / probe judge: cpu, cuda, cuda:N or auto.")
    p.add_argument("--dtype", default="float32",
                   help="local / probe judge: float32 or bfloat16.")
    p.add_argument("--batch-size", type=int, default=None,
                   help="local / probe judge: sequences per forward pass (default 16 / 8).")
    add_engine_options(p)
    p.add_argument("--export-labels", metavar="FILE",
                   help="Write the completions to FILE (.csv or .jsonl) for human labelling "
                        "and stop.")
    p.add_argument("--list-rubrics", action="store_true", help="List shipped rubrics and stop.")
    p.add_argument("--copy-rubric", metavar="DIR",
                   help="Copy --rubric's files (JSON, templates, rules) into DIR for editing "
                        "and stop.")


def add_api_options(p: argparse.ArgumentParser) -> None:
    """The flags of an OpenAI-compatible judge (shared by every command that judges)."""
    p.add_argument("--judge-base-url", default="https://api.openai.com/v1",
                   help="Base URL of the OpenAI-compatible endpoint (openai judge).")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="Name of the environment variable holding the API key (never written "
                        "anywhere).")
    p.add_argument("--judge-workers", type=int, default=8, help="Concurrent requests.")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="Seconds per request.")
    p.add_argument("--judge-retries", type=int, default=5,
                   help="Retries on 429 / 5xx / timeouts, with exponential backoff.")
    p.add_argument("--no-logprobs", action="store_true",
                   help="Do not ask the endpoint for logprobs (read the text answer only).")


def _need(args, *flags: str) -> None:
    from latentaudit.errors import LatentAuditError

    for flag in flags:
        if not getattr(args, flag.lstrip("-").replace("-", "_")):
            raise LatentAuditError(f"{flag} is required here.")


def judge_options(spec: str, args) -> dict:
    """Constructor options of the judge backend ``spec`` names, from the flags."""
    from latentaudit.judges.spec import JudgeSpec, backend_options

    if spec == "auto":
        return {}
    return backend_options(JudgeSpec.parse(spec), args, args.device, args.dtype)


def _report(summary, rubric) -> list[str]:
    """What the stage did, in lines: counts that add up, failures, and the files written."""
    run_ = summary.run
    failed = f", {len(run_.failures)} could not be graded" if run_.failures else ""
    lines = [f"judged {len(run_.verdicts)} completions with {summary.judge} by rubric "
             f"'{rubric.name}': {run_.n_cached} from the cache, {run_.n_graded} graded "
             f"now{failed}",
             "  " + ", ".join(f"{k}: {v}" for k, v in summary.outcomes.items())]
    if run_.failures:
        lines.append(f"{len(run_.failures)} completion(s) could not be graded (excluded; rerun "
                     "to retry):")
        lines += [f"  {f.prompt_id} #{f.sample_index}: {f.error}" for f in run_.failures[:10]]
        if len(run_.failures) > 10:
            lines.append(f"  ... and {len(run_.failures) - 10} more (see 'error' in "
                         f"{summary.out})")
    cached = f" (new verdicts cached in {summary.cache})" if summary.cache else ""
    lines.append(f"wrote {summary.out}{cached}")
    return lines


def run(args) -> int:
    from latentaudit.judges import list_rubrics, load_rubric

    if args.list_rubrics:
        for name in list_rubrics():
            rub = load_rubric(name)
            print(f"{name}: {rub.description}")
        return 0
    _need(args, "--rubric")
    rubric = load_rubric(args.rubric)
    if args.copy_rubric:
        from latentaudit.judges.rubrics import copy_rubric

        for path in copy_rubric(rubric, args.copy_rubric):
            print(f"wrote {path}")
        print(f"edit them, then pass --rubric {os.path.join(args.copy_rubric, rubric.source.name)}")
        return 0
    _need(args, "--completions")
    if args.export_labels:
        from latentaudit.judges.human import export_for_labelling
        from latentaudit.judges.run import items_from_rows, read_completions

        items = items_from_rows(read_completions(args.completions), rubric, args.completions)
        n = export_for_labelling(items, rubric, args.export_labels)
        cols = ", ".join(q.name for q in rubric.questions)
        print(f"wrote {n} completions to {args.export_labels}; fill {cols} (or label: "
              f"positive/negative/excluded), then run with --judge human:{args.export_labels}")
        return 0
    _need(args, "--out")
    from latentaudit.cli._engine import engine_from_args
    from latentaudit.judges import resolve_spec
    from latentaudit.judges.run import judge_file

    engine = engine_from_args(args)
    spec = resolve_spec(args.judge, rubric)
    summary = judge_file(args.completions, rubric, spec, args.out, args.cache, engine=engine,
                         **judge_options(spec, args))
    print("\n".join(_report(summary, rubric)))
    return 1 if summary.run.failures else 0
