"""Options of the execution engine (field docstrings double as ``--help`` text).

Imports only the standard library and :mod:`latentaudit.errors`, so the command line can read
them without importing torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from latentaudit.errors import LatentAuditError

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
            raise LatentAuditError(f"--engine '{self.engine}' is not one of "
                                   f"{', '.join(ENGINES)}.")
        if self.engine == "local" and self.ray_address is not None:
            raise LatentAuditError("--ray-address needs --engine ray.")
        for flag, value, low in (("--ray-workers", self.ray_workers, 1),
                                 ("--ray-retries", self.ray_retries, 0)):
            if value is None and flag == "--ray-workers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LatentAuditError(f"{flag} must be a whole number ≥ {low}, got {value!r}.")

    @property
    def distributed(self) -> bool:
        return self.engine == "ray"


def require_ray():
    """The ``ray`` module, or one clear error that says how to install it."""
    from latentaudit.errors import require

    return require("ray", INSTALL, "--engine ray")
