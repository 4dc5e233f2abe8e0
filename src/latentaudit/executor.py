"""Where a stage's work runs: the executor a stage's driver is handed.

1. :class:`EngineConfig` says which engine (``local`` or ``ray``) and its options (field
   docstrings double as ``--help`` text).
2. :func:`as_executor` turns it into an :class:`Executor`: the local one runs the stage in this
   process (the stage's own code path); another engine is found in :data:`ENGINE_MODULES` and
   imported only when asked for, so the stages never import it and the Ray engine
   (:mod:`latentaudit.distributed`) sits above them, calling their public functions.
3. A stage asks its executor only for the parts of its work that can be spread (attribution
   shards, the corpus scan, judging, steered and sampled rows); with a local executor it runs
   them itself.

Imports only the standard library and :mod:`latentaudit.errors`, so the command line can read
it without importing torch or Ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from latentaudit.options import OptionError, whole

ENGINES = ("local", "ray")
INSTALL = 'pip install "latentaudit[ray]"'


@dataclass
class EngineConfig:
    """Where a stage's work runs."""

    engine: str = "local"
    """local: this process; ray: tasks on the workers of a Ray cluster (started on this machine
    unless --ray-address names one), each loading the model itself."""
    ray_address: str | None = None
    """Address of an existing Ray cluster to join (e.g. ray://head:10001, head:6379 or auto);
    default: start a local one and shut it down at the end."""
    ray_workers: int | None = None
    """Ray workers, each holding its own copy of the model (default: one per CPU of the
    cluster, or one per GPU when the model runs on CUDA)."""
    ray_retries: int = 3
    """Times Ray restarts a worker that died and retries its in-flight task; beyond that the
    run stops, keeping what finished, and a rerun does the rest."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise OptionError("engine", f"{{}} '{self.engine}' is not one of "
                                        f"{', '.join(ENGINES)}.")
        if self.engine == "local" and self.ray_address is not None:
            raise OptionError("ray_address", "{} needs {engine} ray.")
        if self.ray_workers is not None:
            whole("ray_workers", self.ray_workers, 1)
        whole("ray_retries", self.ray_retries, 0)

    @property
    def distributed(self) -> bool:
        return self.engine == "ray"


def require_ray():
    """The ``ray`` module, or one clear error that says how to install it."""
    from latentaudit.errors import require

    return require("ray", INSTALL, "--engine ray")


class Executor(Protocol):
    """What a stage's driver may hand to another engine; ``distributed`` False means the stage
    runs everything itself."""

    config: EngineConfig
    distributed: bool

    def attribute(self, model: str, inputs: Any, cfg: Any, *, checkpoint: Any, device: str,
                  dtype: str) -> Any:
        """An :class:`~latentaudit.attribution.AttributionResult` from checked inputs."""

    def corpus_examples(self, model: Any, saes: dict[int, Any], cfg: Any, keys: dict[int, str],
                        cache_dir: Any) -> dict[int, Any]:
        """The top-activating scan of each layer: {layer: CorpusExamples}."""

    def grade(self, spec: str, rubric: Any, options: dict[str, Any], items: Any,
              cache: Any) -> tuple[Any, Any]:
        """(JudgeRun, judge) of the judge built from ``spec``."""

    def steered_rows(self, device: str, dtype: str) -> Any:
        """A context manager giving the steering sweep a remote row generator."""

    def sample(self, model: str, plan: Any, device: str, dtype: str) -> Any:
        """Sample a planned file of completions; its path."""


@dataclass
class LocalExecutor:
    """This process: every stage runs its own code path."""

    config: EngineConfig
    distributed: bool = False


ENGINE_MODULES = {"ray": "latentaudit.distributed.executor"}
"""Engine name → module defining ``make_executor(config)`` (imported only when asked for)."""


def as_executor(engine: EngineConfig | Executor | None) -> Executor:
    """The executor of ``engine`` (None: local); an :class:`EngineConfig` for another engine
    needs its package (one clear error otherwise)."""
    if engine is None:
        return LocalExecutor(EngineConfig())
    if not isinstance(engine, EngineConfig):
        return engine
    if not engine.distributed:
        return LocalExecutor(engine)
    require_ray()
    return importlib.import_module(ENGINE_MODULES[engine.engine]).make_executor(engine)
