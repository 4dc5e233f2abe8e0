"""Steering sweeps on Ray workers: the steered completions, batches of rows as tasks.

1. The sweep runs as it does locally (:mod:`latentaudit.steer.sweep`): plan, r̄, latent sets,
   conditions, log-odds check, grading and the table stay in the driver.
2. Its generation step, and the strength search's trials, hand the rows still missing
   (condition, prompt, sample) to :class:`RemoteRows`: batches go to idle workers, each
   carrying its conditions' steering vectors; a worker loads the model (or the ``toward``
   model) by name once.
3. A row's seed is that of its (prompt, sample) under every condition, whatever batch or worker
   it lands in, so the rows are those of the local path. The driver appends each finished
   batch to ``steer/completions.jsonl`` and fsyncs it; a rerun generates only missing rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from latentaudit._io import append_jsonl
from latentaudit.distributed.pool import WorkerPool
from latentaudit.executor import EngineConfig


class RemoteRows:
    """:func:`~latentaudit.steer.generation.generate_rows` on Ray workers; a context manager
    that holds the workers for the whole sweep."""

    def __init__(self, engine: EngineConfig, *, device: str = "auto",
                 dtype: str = "float32") -> None:
        self.pool = WorkerPool(engine, device=device, dtype=dtype)

    def __enter__(self) -> RemoteRows:
        self.pool.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.pool.__exit__(*exc)

    def generate_rows(self, loaded, layer: int, todo: Sequence[tuple], prompt_ids: dict,
                      vectors: dict, cfg, path: Path, desc: str = "steer",
                      point: str = "resid_post") -> int:
        """Generate ``todo`` rows (condition, prompt_id, sample_index) into ``path``."""
        if not todo:
            return 0
        step = cfg.batch_size
        batches = [list(todo[k:k + step]) for k in range(0, len(todo), step)]
        tasks = [(b, {pid: prompt_ids[pid] for _, pid, _ in b},
                  {c.key: vectors[c.key] for c, _, _ in b}) for b in batches]
        shared = self.pool.share((loaded.name, layer, point, cfg))
        with open(path, "a", encoding="utf-8") as f:
            self.pool.run(_rows, tasks, shared=shared,
                          on_result=lambda _, rows: append_jsonl(f, rows),
                          sizes=[len(b) for b in batches], desc=desc, unit="completion")
        return len(todo)


def _rows(worker, shared, batch, prompt_ids, vectors) -> list[dict]:
    from latentaudit.steer.generation import steered_rows

    model, layer, point, cfg = shared
    return steered_rows(worker.model(model), layer, batch, prompt_ids, vectors, cfg, point)
