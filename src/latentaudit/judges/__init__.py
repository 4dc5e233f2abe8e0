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
from latentaudit.judges.spec import BACKENDS, JudgeSpec, backend_options

__all__ = ["BACKENDS", "Answer", "Decision", "Judge", "JudgeCache", "JudgeItem", "JudgeRun",
           "JudgeSpec", "Rubric", "Verdict", "backend_options", "cache_key", "grade_all",
           "list_rubrics", "load_rubric", "make_judge", "resolve_spec"]


def resolve_spec(spec: str, rubric: Rubric) -> str:
    """``auto`` becomes ``probe`` when a probe ships for the rubric, else ``rules``."""
    return str(JudgeSpec.parse(spec, rubric))


def make_judge(spec: str | JudgeSpec, rubric: Rubric, **options: Any) -> Judge:
    """Build the judge a ``--judge`` spec names; ``options`` go to the backend's constructor
    (:func:`~latentaudit.judges.spec.backend_options` builds them)."""
    s = spec if isinstance(spec, JudgeSpec) else JudgeSpec.parse(spec, rubric)
    s.check_arg()
    cls = s.judge_class()
    if s.backend == "rules":
        return cls(rubric, s.arg)
    if s.backend == "human":
        return cls(s.arg, rubric)
    return cls(s.arg or rubric.name, rubric, **options)  # probe: the rubric's shipped one
