"""``latentaudit judge``: grade completions by a rubric (rules, LLM, local model or human)."""

from __future__ import annotations

import argparse
import os

from latentaudit.cli._options import Config, Flag

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

CONFIG = Config("latentaudit.judges.config", "JudgeConfig", export_labels=Flag(metavar="FILE"),
                copy_rubric=Flag(metavar="DIR"))
"""The JudgeConfig flags (each written once, as its field)."""
API = Config("latentaudit.judges.config", "ApiOptions")
"""The flags of an OpenAI-compatible judge."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentaudit.cli._engine import add_engine_options

    CONFIG.add(p, "completions", "rubric", "judge", "out", "cache")
    add_api_options(p)
    CONFIG.add(p, "judge_model", "device", "dtype", "batch_size")
    add_engine_options(p)
    CONFIG.add(p, "export_labels", "list_rubrics", "copy_rubric")


def add_api_options(p: argparse.ArgumentParser) -> None:
    """The flags of an OpenAI-compatible judge (shared by every command that judges)."""
    API.add(p)


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

    cfg = CONFIG.build(args)
    if cfg.list_rubrics:
        for name in list_rubrics():
            rub = load_rubric(name)
            print(f"{name}: {rub.description}")
        return 0
    _need(cfg, "--rubric")
    rubric = load_rubric(cfg.rubric)
    if cfg.copy_rubric:
        from latentaudit.judges.rubrics import copy_rubric

        for path in copy_rubric(rubric, cfg.copy_rubric):
            print(f"wrote {path}")
        print(f"edit them, then pass --rubric {os.path.join(cfg.copy_rubric, rubric.source.name)}")
        return 0
    _need(cfg, "--completions")
    if cfg.export_labels:
        from latentaudit.judges.human import export_for_labelling
        from latentaudit.judges.run import items_from_rows, read_completions

        items = items_from_rows(read_completions(cfg.completions), rubric, cfg.completions)
        n = export_for_labelling(items, rubric, cfg.export_labels)
        cols = ", ".join(q.name for q in rubric.questions)
        print(f"wrote {n} completions to {cfg.export_labels}; fill {cols} (or label: "
              f"positive/negative/excluded), then run with --judge human:{cfg.export_labels}")
        return 0
    _need(cfg, "--out")
    from latentaudit.cli._engine import engine_from_args
    from latentaudit.judges import resolve_spec
    from latentaudit.judges.run import judge_file

    engine = engine_from_args(args)
    spec = resolve_spec(cfg.judge, rubric)
    summary = judge_file(cfg.completions, rubric, spec, cfg.out, cfg.cache, engine=engine,
                         **judge_options(spec, args))
    print("\n".join(_report(summary, rubric)))
    return 1 if summary.run.failures else 0
