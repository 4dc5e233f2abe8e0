"""Judging on Ray workers: chunks of completions as tasks, verdicts cached by the driver.

1. One worker builds the judge from its ``--judge`` spec and options (a local or probe judge
   loads its model there, never in the driver) and reports the judge's id and chunk size; every
   worker builds the same judge once, on its first chunk.
2. :func:`~latentaudit.judges.base.grade_all` runs as it does locally: the cache answers what it
   holds and repeated completions are sent once; only the chunks of the rest go to idle
   workers.
3. The driver appends each chunk's successful verdicts to the judge cache as it arrives, so a
   killed worker loses only its chunk in flight and a rerun grades only what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from latentaudit.distributed.pool import WorkerPool
from latentaudit.executor import EngineConfig
from latentaudit.judges.base import JudgeCache, JudgeItem, JudgeRun, grade_all
from latentaudit.judges.rubrics import Rubric


@dataclass
class RemoteJudge:
    """The driver's view of a judge that grades on the workers (its id names the verdicts)."""

    id: str
    rubric: Rubric
    chunk_size: int


def grade_all_ray(spec: str, rubric: Rubric, options: dict[str, Any],
                  items: Sequence[JudgeItem], cache: JudgeCache | None,
                  engine: EngineConfig) -> tuple[JudgeRun, RemoteJudge]:
    """:func:`~latentaudit.judges.base.grade_all` with the judge of ``spec`` on Ray workers."""
    device, dtype = options.get("device", "auto"), options.get("dtype", "float32")
    with WorkerPool(engine, device=device, dtype=dtype) as pool:
        shared = pool.share((spec, rubric, options))
        judge_id, chunk_size = pool.call(_describe, shared=shared)
        judge = RemoteJudge(judge_id, rubric, chunk_size)

        def run_chunks(chunks: list[list[JudgeItem]], keep) -> None:
            pool.run(_grade, [(c,) for c in chunks], shared=shared, on_result=keep,
                     sizes=[len(c) for c in chunks], desc=f"judging ({judge.id})", unit="item")

        return grade_all(judge, items, cache, run_chunks=run_chunks), judge


def _judge(worker, shared):
    if "judge" not in worker.memo:
        from latentaudit.judges import make_judge

        spec, rubric, options = shared
        worker.memo["judge"] = make_judge(spec, rubric, **options)
    return worker.memo["judge"]


def _describe(worker, shared) -> tuple[str, int]:
    judge = _judge(worker, shared)
    return judge.id, getattr(judge, "chunk_size", 32)


def _grade(worker, shared, chunk: list[JudgeItem]):
    return _judge(worker, shared).grade(chunk)
