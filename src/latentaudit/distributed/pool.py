"""Ray workers that each load the model once, and a driver loop that streams their results.

1. :class:`WorkerPool` joins the cluster at ``--ray-address``, or starts a local one (shut down
   on exit), and starts ``--ray-workers`` actors of :class:`Worker` (one CPU each, or one GPU
   each when the model runs on CUDA). Ray restarts an actor that dies and retries its
   in-flight call, ``--ray-retries`` times.
2. :meth:`WorkerPool.share` puts an object every task of a stage reads (the checked inputs, a
   plan) into the object store once; a worker fetches it on first use and keeps the latest.
3. :meth:`WorkerPool.run` gives each idle worker the next task, a module-level function
   ``fn(worker, shared, *args)``, and hands every result to ``on_result`` in the driver as soon
   as it arrives, with a progress bar (count, ETA). Only the driver writes the run folder, so
   workers on other machines need no shared disk.
4. A task's :class:`~latentaudit.errors.LatentAuditError` reaches the caller unchanged; a worker
   that died more often than ``--ray-retries`` ends the run with one error that says finished
   work is kept and a rerun does the rest.

The model is loaded by every worker from the same name or path (:meth:`Worker.model`), so it
must be reachable by that name on every machine of the cluster, as must latentaudit itself.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from latentaudit.errors import LatentAuditError
from latentaudit.executor import EngineConfig, require_ray

log = logging.getLogger(__name__)


class Worker:
    """What one Ray actor holds: the models it loaded and the stage's shared object."""

    def __init__(self, device: str, dtype: str) -> None:
        os.environ["LATENTAUDIT_QUIET"] = "1"  # the driver shows the progress
        self.device, self.dtype = device, dtype
        self._models: dict[str, Any] = {}
        self._shared_key: str | None = None
        self._shared: Any = None
        self.memo: dict[str, Any] = {}
        """Per shared object: what a stage's tasks build once (SAEs on the device, a judge)."""

    def model(self, name: str):
        """The model ``name`` on this worker's device, loaded on first use."""
        if name not in self._models:
            from transformers.utils import logging as hf_logging

            from latentaudit.models.load import load_model

            hf_logging.disable_progress_bar()
            self._models[name] = load_model(name, device=self.device, dtype=self.dtype)
        return self._models[name]

    def call(self, fn: Callable, key: str | None, holder: list | None, args: tuple) -> Any:
        """Run ``fn(self, shared, *args)``; ``holder`` = [object ref] of the shared object."""
        if key is not None and key != self._shared_key:
            import ray

            self._shared, self._shared_key, self.memo = ray.get(holder[0]), key, {}
        return fn(self, self._shared if key is not None else None, *args)


class Shared(NamedTuple):
    """A handle on an object in the cluster's object store (see :meth:`WorkerPool.share`)."""

    key: str
    holder: list
    """[object ref]: inside a list, so Ray passes the ref instead of resolving it per call."""


class WorkerPool:
    """Ray workers for one stage; a context manager (see the module docstring)."""

    def __init__(self, engine: EngineConfig, *, device: str = "auto",
                 dtype: str = "float32") -> None:
        self.engine, self.device, self.dtype = engine, device, dtype
        self.actors: list = []
        self._started = False

    def __enter__(self) -> WorkerPool:
        self.ray = ray = require_ray()
        if not ray.is_initialized():
            address = self.engine.ray_address
            kwargs: dict[str, Any] = dict(logging_level=logging.WARNING)
            if not (address or os.environ.get("RAY_ADDRESS")):  # Ray joins $RAY_ADDRESS
                kwargs["include_dashboard"] = False
            try:  # "local": a new cluster, not one a `ray start` left running on this machine
                ray.init(address=address or "local", **kwargs)
            except Exception as err:  # Ray raises many kinds; each is about the cluster
                what = (f"--ray-address {address}: could not join the Ray cluster" if address
                        else "--engine ray: could not start or join a Ray cluster")
                raise LatentAuditError(f"{what} ({str(err).splitlines()[0]}).") from None
            self._started = True
        try:
            self._start_actors()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_actors(self) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        gpu = self.device.startswith("cuda") or (self.device == "auto"
                                                 and resources.get("GPU", 0) >= 1)
        n = self.engine.ray_workers or max(1, int(resources.get("GPU" if gpu else "CPU", 1)))
        retries = self.engine.ray_retries
        actor = ray.remote(Worker).options(num_cpus=1, num_gpus=1 if gpu else 0,
                                           max_restarts=retries, max_task_retries=retries)
        self.actors = [actor.remote(self.device, self.dtype) for _ in range(n)]
        log.info("Ray: %d worker(s) on %s", n, "GPUs" if gpu else "CPUs")

    def __exit__(self, *exc) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False

    @property
    def n_workers(self) -> int:
        return len(self.actors)

    def share(self, obj: Any) -> Shared:
        """Put ``obj`` in the object store once for every task that reads it."""
        return Shared(uuid.uuid4().hex, [self.ray.put(obj)])

    def run(self, fn: Callable, tasks: Sequence[tuple], *, shared: Shared | None = None,
            on_result: Callable[[int, Any], None], sizes: Sequence[int] | None = None,
            desc: str = "", unit: str = "task", initial: int = 0, quiet: bool = False) -> None:
        """Run ``fn(worker, shared, *task)`` for every task, one per idle worker at a time,
        calling ``on_result(task index, result)`` in this process as each one finishes."""
        from latentaudit._progress import progress

        sizes = list(sizes) if sizes is not None else [1] * len(tasks)
        key, holder = shared if shared is not None else (None, None)
        queue, idle, pending = deque(enumerate(tasks)), list(self.actors), {}
        with progress(total=initial + sum(sizes), desc=desc, unit=unit, initial=initial,
                      disable=True if quiet else None) as bar:
            while queue or pending:
                while idle and queue:
                    i, args = queue.popleft()
                    a = idle.pop()
                    pending[a.call.remote(fn, key, holder, tuple(args))] = (a, i)
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                a, i = pending.pop(ready[0])
                on_result(i, self._get(ready[0], desc, unit))
                bar.update(sizes[i])
                idle.append(a)

    def call(self, fn: Callable, *args: Any, shared: Shared | None = None) -> Any:
        """``fn(worker, shared, *args)`` on one worker; its result."""
        out: list = []
        self.run(fn, [args], shared=shared, on_result=lambda _, r: out.append(r), quiet=True)
        return out[0]

    def _get(self, ref, desc: str, unit: str) -> Any:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, LatentAuditError):
                raise type(cause)(str(cause)) from None
            raise
        except exceptions.RayActorError as err:
            raise LatentAuditError(
                f"a Ray worker died{f' during {desc}' if desc else ''} after "
                f"{self.engine.ray_retries} restart(s) (--ray-retries): every finished {unit} "
                f"is kept; rerun the same command to do the rest ({type(err).__name__}).") \
                from None
