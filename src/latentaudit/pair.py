"""The pair stage: judged completions -> the behaviour dataset (positive / negative per prompt).

1. Read ``judged.jsonl`` (written by ``latentaudit judge``).
2. Apply the rubric's threshold rule to each row's answers (the rubric recorded in the row, or
   one given explicitly, e.g. an edited copy with other thresholds): ``positive``, ``negative``
   or ``excluded`` (failed judge, refusal, incoherent, ambiguous middle band, ...).
3. Write positives and negatives in the core dataset format of
   :mod:`latentaudit.data.behaviour` (each row validated by ``parse_row``), carrying
   ``prompt_token_ids`` / ``completion_token_ids`` and ``meta`` through; the judge's answers,
   ``sample_index`` and any other extra fields go under ``meta``.
4. Count positives / negatives / excluded per prompt and form pairs with
   :func:`~latentaudit.data.behaviour.make_pairs` (``all`` or ``matched``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentaudit._io import read_jsonl, write_jsonl
from latentaudit.data.behaviour import (
    PAIRINGS,
    Pairing,
    default_prompt_id,
    make_pairs,
    parse_row,
)
from latentaudit.errors import LatentAuditError
from latentaudit.judges.base import Verdict
from latentaudit.judges.rubrics import Rubric, load_rubric
from latentaudit.judges.run import JUDGE_FIELDS
from latentaudit.options import check_choices

log = logging.getLogger(__name__)

CORE = ("prompt", "completion", "prompt_id", "prompt_token_ids", "completion_token_ids")


@dataclass
class PairConfig:
    """The options of ``latentaudit pair`` (field docstrings are its ``--help`` text)."""

    judged: str
    """Judged JSONL (from `latentaudit judge`)."""
    out: str
    """Output dataset JSONL."""
    rubric: str | None = None
    """Rubric whose threshold rule to apply (default: the one the completions were judged
    with); e.g. an edited copy."""
    pairing: str = field(default="all", metadata={"choices": PAIRINGS})
    """Pairs within a prompt: every positive×negative, or one-to-one."""
    show: int = 30
    """Prompts listed in the count table."""

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class PairResult:
    """The dataset and its bookkeeping."""

    rows: list[dict[str, Any]]
    """Dataset rows (positives and negatives), in input order."""
    counts: dict[str, Counter]
    """prompt_id -> Counter of positive / negative / excluded, in first-seen order."""
    reasons: Counter
    """Why completions were excluded -> how many."""
    pairing: Pairing
    rubric: str


def read_judged(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) for every row of a judged JSONL file; one error lists every bad file:line."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"--judged {path}: no such file.")
    return read_jsonl(path, _judged_row, "judged completions")


def _judged_row(row: Any, where: str) -> tuple[dict[str, Any] | None, list[str]]:
    if not isinstance(row, dict) or not isinstance(row.get("answers"), dict) \
            or "completion" not in row:
        return None, [f"{where}: not a judged row (no 'answers'); pass the output of "
                      "`latentaudit judge`"]
    return row, []


def rubric_of(rows: list[tuple[int, dict[str, Any]]], path: str | Path) -> Rubric:
    """The rubric the rows were judged with (its file when it was an edited copy)."""
    refs = {(r.get("rubric_source") or r.get("rubric")) for _, r in rows}
    if len(refs) != 1 or None in refs:
        raise LatentAuditError(f"{path}: rows were judged with different or unnamed rubrics "
                               f"({', '.join(sorted(map(str, refs)))}); pass --rubric.")
    return load_rubric(refs.pop())


def dataset_row(row: dict[str, Any], label: str, rubric: Rubric, verdict: Verdict,
                why: str) -> dict[str, Any]:
    """One core-format row from a judged row."""
    extra = {k: v for k, v in row.items()
             if k not in CORE and k not in JUDGE_FIELDS and k not in ("meta", "label", "score")}
    meta = {**(row.get("meta") or {}), **extra,
            "judge": {"id": row.get("judge"), "rubric": rubric.name, "why": why,
                      "answers": {k: {"score": a.score, "label": a.label}
                                  for k, a in verdict.answers.items()}}}
    out = {"prompt": row["prompt"], "completion": row["completion"], "label": label,
           "prompt_id": str(row.get("prompt_id") or default_prompt_id(row["prompt"])),
           "score": rubric.dataset_score(verdict.answers), "meta": meta}
    for key in ("prompt_token_ids", "completion_token_ids"):
        if row.get(key):
            out[key] = row[key]
    return out


def build_dataset(rows: list[tuple[int, dict[str, Any]]], rubric: Rubric, path: str | Path,
                  pairing: str = "all") -> PairResult:
    """Threshold, validate and pair judged rows (see the module docstring)."""
    out, comps, errs = [], [], []
    counts: dict[str, Counter] = {}
    reasons: Counter = Counter()
    for n, row in rows:
        verdict = Verdict.from_dict({"answers": row["answers"], "error": row.get("error"),
                                     "outcome": row.get("judge_outcome")})
        decision = rubric.decide(verdict.answers, verdict.error, verdict.outcome)
        outcome, why = decision.outcome, decision.why
        if outcome != "excluded" and row.get("completion") == "" \
                and not row.get("completion_token_ids"):
            outcome, why = "excluded", "empty completion"
        pid = str(row.get("prompt_id") or default_prompt_id(row.get("prompt", "")))
        counts.setdefault(pid, Counter())[outcome] += 1
        if outcome == "excluded":
            reasons[why] += 1
            continue
        ds = dataset_row(row, outcome, rubric, verdict, why)
        comp, problems = parse_row(ds, f"{path}:{n}")
        errs.extend(problems)
        if comp is not None:
            out.append(ds)
            comps.append(comp)
    if errs:
        raise LatentAuditError(f"{path} has {len(errs)} row(s) that do not make valid dataset "
                               "rows; fix them and rerun:\n  " + "\n  ".join(errs[:20]))
    return PairResult(rows=out, counts=counts, reasons=reasons,
                      pairing=make_pairs(comps, pairing), rubric=rubric.name)


def pair_file(judged: str | Path, out: str | Path, rubric: str | Path | None = None,
              pairing: str = "all") -> PairResult:
    """Read ``judged``, write the dataset to ``out``; returns the counts and pairs."""
    rows = read_judged(judged)
    rub = load_rubric(rubric) if rubric is not None else rubric_of(rows, judged)
    result = build_dataset(rows, rub, judged, pairing)
    if not result.rows:
        raise LatentAuditError(f"{judged}: no completion was labelled positive or negative "
                               f"({', '.join(f'{k}: {v}' for k, v in result.reasons.items())}); "
                               "nothing to write.")
    write_jsonl(out, result.rows)
    return result
