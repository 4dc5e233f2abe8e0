"""The Ray executor: what a stage hands to ``--engine ray`` (see :mod:`latentaudit.executor`).

Each method runs one spreadable part of a stage on the workers of a Ray cluster, through the
stage's public functions; the stage's driver decides when to ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from latentaudit.executor import EngineConfig


@dataclass
class RayExecutor:
    """Stages' work on Ray workers (each loads the model itself)."""

    config: EngineConfig
    distributed: bool = True

    def attribute(self, model: str, inputs, cfg, *, checkpoint, device: str, dtype: str):
        from latentaudit.distributed.attribute import attribute_ray

        return attribute_ray(model, inputs, cfg, self.config, checkpoint=checkpoint,
                             device=device, dtype=dtype)

    def corpus_examples(self, model, saes: dict[int, Any], cfg, keys: dict[int, str],
                        cache_dir) -> dict[int, Any]:
        from latentaudit.distributed.examples import corpus_examples_ray
        from latentaudit.distributed.pool import WorkerPool

        dtype = str(next(model.model.parameters()).dtype).replace("torch.", "")
        with WorkerPool(self.config, device=str(model.device), dtype=dtype) as pool:
            return {L: corpus_examples_ray(pool, model, s, L, cfg, keys[L], cache_dir)
                    for L, s in saes.items()}

    def grade(self, spec: str, rubric, options: dict[str, Any], items, cache):
        from latentaudit.distributed.judge import grade_all_ray

        return grade_all_ray(spec, rubric, options, items, cache, self.config)

    def steered_rows(self, device: str, dtype: str):
        from latentaudit.distributed.steer import RemoteRows

        return RemoteRows(self.config, device=device, dtype=dtype)

    def sample(self, model: str, plan, device: str, dtype: str):
        from latentaudit.distributed.sample import sample_ray

        return sample_ray(model, plan, self.config, device=device, dtype=dtype)


def make_executor(config: EngineConfig) -> RayExecutor:
    return RayExecutor(config)
