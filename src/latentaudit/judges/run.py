"""The judge stage: completions.jsonl in, judged.jsonl out (resumable through the cache).

1. Read ``completions.jsonl`` (rows with ``prompt``, ``completion``, optional ``prompt_id``,
   ``sample_index``, ``meta`` with ``fact``, token ids, ...); every problem is reported with
   file:line. A rubric whose template uses ``{fact}`` needs ``meta.fact`` on every row.
2. Build the judge from its ``--judge`` spec only now, so a bad file is reported before any
   judge model loads; grade every row through the cache
   (:func:`~latentaudit.judges.base.grade_all`).
3. Write ``judged.jsonl``: each input row unchanged plus ``judge``, ``rubric``,
   ``rubric_source`` (the rubric file, for edited rubrics), ``rubric_hash``, ``answers``,
   ``error``, ``judge_outcome`` (a human's direct label, else null), and the rubric's
   ``outcome`` / ``why`` (``latentaudit pair`` recomputes them, so thresholds can be changed
   without judging again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentaudit._io import read_jsonl, write_jsonl
from latentaudit.data.tokens import is_chat_messages
from latentaudit.errors import LatentAuditError
from latentaudit.executor import as_executor
from latentaudit.judges.base import Judge, JudgeCache, JudgeItem, JudgeRun, grade_all
from latentaudit.judges.rubrics import Rubric, shipped_dir

JUDGE_FIELDS = ("judge", "rubric", "rubric_source", "rubric_hash", "answers", "error",
                "judge_outcome", "outcome", "why")


def read_completions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a completions JSONL file, validated; each gets ``_line`` (its 1-based line)."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"--completions {path}: no such file.")
    return [{**row, "_line": n} for n, row in read_jsonl(
        path, lambda row, where: (row, check_row(row, where)), "completions")]


def check_row(row: Any, where: str) -> list[str]:
    """Problems of one completions row (prompt, completion, meta, sample_index), each naming
    ``where``; [] when it is fine."""
    if not isinstance(row, dict):
        return [f"{where}: expected a JSON object"]
    errs = []
    if not (isinstance(row.get("prompt"), str) or is_chat_messages(row.get("prompt"))):
        errs.append(f"{where}: field 'prompt' must be a string or a list of chat messages")
    if not isinstance(row.get("completion"), str):
        errs.append(f"{where}: field 'completion' is required and must be a string")
    if "meta" in row and not isinstance(row["meta"], dict):
        errs.append(f"{where}: field 'meta' must be an object")
    si = row.get("sample_index")
    if si is not None and (isinstance(si, bool) or not isinstance(si, int)):
        errs.append(f"{where}: field 'sample_index' must be a whole number")
    return errs


def row_fact(row: dict[str, Any]) -> str | None:
    fact = (row.get("meta") or {}).get("fact", row.get("fact"))
    return fact if isinstance(fact, str) and fact.strip() else None


def items_from_rows(rows: list[dict[str, Any]], rubric: Rubric,
                    path: str | Path) -> list[JudgeItem]:
    """One :class:`JudgeItem` per row; checks that a fact-using rubric gets its facts."""
    from latentaudit.data.behaviour import default_prompt_id

    if rubric.needs_fact:
        missing = [r["_line"] for r in rows if row_fact(r) is None]
        if missing:
            lines = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise LatentAuditError(
                f"{path}: {len(missing)} row(s) have no meta.fact (lines {lines}); the "
                f"'{rubric.name}' rubric shows the judge the correct fact, so sample from a "
                "suite whose prompts carry 'fact'.")
    return [JudgeItem(prompt=r["prompt"], completion=r["completion"], fact=row_fact(r),
                      prompt_id=str(r.get("prompt_id") or default_prompt_id(r["prompt"])),
                      sample_index=r.get("sample_index"),
                      claim=(r.get("meta") or {}).get("claim"), system=row_system(r))
            for r in rows]


def row_system(row: dict[str, Any]) -> str | None:
    """The system prompt a row was sampled under: its ``system``, else ``meta.sampling``'s."""
    system = row.get("system")
    if system is None:
        system = ((row.get("meta") or {}).get("sampling") or {}).get("system")
    return system if isinstance(system, str) and system else None


@dataclass
class JudgeSummary:
    """What one judge stage did."""

    run: JudgeRun
    outcomes: dict[str, int]
    """positive / negative / excluded -> count under the rubric's threshold rule."""
    out: Path
    judge: str
    """The judge's id."""
    cache: Path | None
    """The verdict cache, when this run added verdicts to it; else None."""


def judge_file(completions: str | Path, rubric: Rubric, judge: Judge | str, out: str | Path,
               cache_path: str | Path | None = None, engine=None, **options: Any
               ) -> JudgeSummary:
    """Grade every completion in ``completions`` and write ``out`` (see the module docstring).

    ``judge`` is a judge or a ``--judge`` spec built with ``options`` by
    :func:`~latentaudit.judges.make_judge` once the completions have been checked, so a bad
    file is reported before any judge model loads. ``engine``: an
    :class:`~latentaudit.executor.Executor` (or its ``EngineConfig``); with ``--engine ray`` a
    spec's judge is built and run on Ray workers.
    """
    out = Path(out)
    rows = read_completions(completions)
    items = items_from_rows(rows, rubric, completions)
    cache = JudgeCache(cache_path or out.parent / "judge_cache.jsonl")
    executor = as_executor(engine)
    if isinstance(judge, str) and executor.distributed:
        run, judge = executor.grade(judge, rubric, options, items, cache)
    else:
        if isinstance(judge, str):
            from latentaudit.judges import make_judge

            judge = make_judge(judge, rubric, **options)
        run = grade_all(judge, items, cache)
    shipped = rubric.source is not None and rubric.source.parent == shipped_dir()
    outcomes = {"positive": 0, "negative": 0, "excluded": 0}
    judged = []
    for row, verdict in zip(rows, run.verdicts, strict=True):
        decision = rubric.decide(verdict.answers, verdict.error, verdict.outcome)
        outcomes[decision.outcome] += 1
        base = {k: v for k, v in row.items() if k != "_line" and k not in JUDGE_FIELDS}
        judged.append({**base, "judge": judge.id, "rubric": rubric.name,
                       "rubric_source": None if shipped else str(rubric.source),
                       "rubric_hash": rubric.prompt_hash,
                       "answers": {k: a.to_dict() for k, a in verdict.answers.items()},
                       "error": verdict.error, "judge_outcome": verdict.outcome,
                       "outcome": decision.outcome, "why": decision.why})
    write_jsonl(out, judged)
    return JudgeSummary(run=run, outcomes=outcomes, out=out, judge=judge.id,
                        cache=cache.path if cache.n_written else None)
