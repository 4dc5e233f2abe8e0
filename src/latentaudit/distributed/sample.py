"""Sampling on Ray workers: the rows of :mod:`latentaudit.sample`, batches as tasks.

1. One worker loads the model and makes the manifest; the driver checks it against earlier
   output (only ``n`` may grow) and writes it, as the local path does.
2. The rows still missing go in batches of ``batch_size`` to idle workers. A row's completion
   depends only on its own seed (sha256 of seed, prompt_id, sample_index), never on its batch
   or worker, so the completions are those of the local path.
3. The driver appends each finished batch to the output and fsyncs it; a killed worker or
   driver loses only batches in flight, and a rerun samples only the missing rows.
4. Once every row is there, the file is rewritten (atomically) in prompt order then sample
   order, the order the local path writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentaudit._io import append_jsonl, atomic_open, complete_lines
from latentaudit.distributed.pool import WorkerPool
from latentaudit.executor import EngineConfig
from latentaudit.sample import SamplePlan, model_manifest, record_manifest, sample_rows


def sample_ray(model: str, plan: SamplePlan, engine: EngineConfig, *, device: str = "auto",
               dtype: str = "float32") -> Path:
    """Sample what :func:`~latentaudit.sample.plan_sampling` left to do on Ray workers."""
    cfg, out, todo = plan.cfg, plan.out, plan.todo
    batches = [todo[k:k + cfg.batch_size] for k in range(0, len(todo), cfg.batch_size)]
    with WorkerPool(engine, device=device, dtype=dtype) as pool:
        record_manifest(plan, pool.call(_manifest, model, plan))
        shared = pool.share((model, cfg))
        with open(out, "a", encoding="utf-8") as f:
            pool.run(_rows, [(b,) for b in batches], shared=shared,
                     on_result=lambda _, rows: append_jsonl(f, rows),
                     sizes=[len(b) for b in batches], desc="sample", unit="completion",
                     initial=len(plan.done))
    in_plan_order(plan)
    return out


def _manifest(worker, _, model: str, plan: SamplePlan) -> dict:
    return model_manifest(worker.model(model), plan)


def _rows(worker, shared, batch) -> list[dict]:
    model, cfg = shared
    encoded = worker.memo.setdefault("encoded", {})
    return sample_rows(worker.model(model), batch, cfg, encoded)


def in_plan_order(plan: SamplePlan) -> None:
    """Rewrite the output in prompt order then sample order (rows of other prompts last)."""
    rank = {p.prompt_id: k for k, p in enumerate(plan.prompts)}
    lines = [line for line in complete_lines(plan.out) if line.strip()]

    def order(line: bytes) -> tuple[int, int]:
        row = json.loads(line)
        return rank.get(str(row["prompt_id"]), len(rank)), int(row["sample_index"])

    ordered = sorted(lines, key=order)
    if ordered != lines:
        with atomic_open(plan.out, "wb") as f:
            f.write(b"".join(line + b"\n" for line in ordered))
