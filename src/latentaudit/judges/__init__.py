"""Judges grade completions by a rubric; :func:`make_judge` builds one from a ``--judge`` spec.

Specs: ``auto`` (the rubric's shipped probe when it has one, else its rules); ``rules`` (the
rubric's shipped rules file) or ``rules:PATH``; ``openai:MODEL`` (any OpenAI-compatible
endpoint); ``local:MODEL`` (a Hugging Face model: embedded name, folder or hub id);
``human:LABELS`` (a filled ``.csv`` / ``.jsonl`` from ``--export-labels``); ``probe`` (the shipped
probe for the rubric) or ``probe:FILE`` (one from ``latentaudit train-judge``). Every judge is
wrapped by the cache in :func:`~latentaudit.judges.base.grade_all`.
"""

from __future__ import annotations

from typing import Any

from latentaudit.errors import LatentAuditError
from latentaudit.judges.base import (
    Judge,
    JudgeCache,
    JudgeItem,
    JudgeRun,
    Verdict,
    cache_key,
    grade_all,
)
from latentaudit.judges.rubrics import Answer, Decision, Rubric, list_rubrics, load_rubric

BACKENDS = ("rules", "openai", "local", "human", "probe")

__all__ = ["Answer", "Decision", "Judge", "JudgeCache", "JudgeItem", "JudgeRun", "Rubric",
           "Verdict", "cache_key", "grade_all", "list_rubrics", "load_rubric", "make_judge",
           "resolve_spec"]


def resolve_spec(spec: str, rubric: Rubric) -> str:
    """``auto`` becomes ``probe`` when a probe ships for the rubric, else ``rules``."""
    if spec != "auto":
        return spec
    from latentaudit.judges.probe import shipped_probes

    return "probe" if rubric.name in shipped_probes() else "rules"


def make_judge(spec: str, rubric: Rubric, **options: Any) -> Judge:
    """Build the judge a ``--judge`` spec names; ``options`` go to the backend's constructor."""
    kind, _, arg = resolve_spec(spec, rubric).partition(":")
    if kind == "rules":
        from latentaudit.judges.rules import RuleJudge

        return RuleJudge(rubric, arg or None)
    if kind == "probe":
        from latentaudit.judges.probe import ProbeJudge

        return ProbeJudge(arg or rubric.name, rubric, **options)
    if kind in ("openai", "local", "human") and not arg:
        raise LatentAuditError(f"--judge {spec}: write {kind}:"
                               f"{'LABELS_FILE' if kind == 'human' else 'MODEL'}.")
    if kind == "openai":
        from latentaudit.judges.openai import OpenAIJudge

        return OpenAIJudge(arg, rubric, **options)
    if kind == "local":
        from latentaudit.judges.local import LocalJudge

        return LocalJudge(arg, rubric, **options)
    if kind == "human":
        from latentaudit.judges.human import HumanJudge

        return HumanJudge(arg, rubric)
    raise LatentAuditError(f"--judge {spec}: the backend must be one of "
                           f"{', '.join(BACKENDS)} (e.g. rules, openai:gpt-4o, local:MODEL, "
                           "human:labels.csv, probe:probe.safetensors).")
