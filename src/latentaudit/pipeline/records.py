"""``RUN/pipeline.json``: what each stage of a run did, and the fingerprints that decide what to
redo.

A stage's fingerprint is sha256 of (its name, its effective config, the fingerprints of the
stages it reads, the sha256 of the outside files it reads). Options that do not change a
stage's results (device, batch sizes, checkpoint intervals, API concurrency and timeouts) are
left out, so changing them redoes nothing.

File (schema_version 1): ``schema_version``, ``config`` (the config file), ``run``, ``entry``,
``model``, ``sae``, ``notes`` ([str]: lines for the report, e.g. the sizes of the demo),
``updated`` and ``stages`` {name: {``status``, ``fingerprint``, ``reads``, ``config``,
``inputs``, ``outputs``, ``summary``, ``started``, ``finished``, ``seconds``, ``reason``}}.
Status: ``done``; ``partial`` (started, not finished: a rerun resumes it); ``given`` (its output
is a file the config names); ``unused`` (before the entry point); ``skipped`` (left out by the
config, or the report when its extra (jinja2, matplotlib) is not installed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from latentaudit._io import sha256_file, write_json
from latentaudit.errors import LatentAuditError

SCHEMA_VERSION = 1
FILE = "pipeline.json"
VOLATILE = ("batch_size", "exact_batch_size", "checkpoint_every_batches",
            "checkpoint_every_seconds", "judge_workers", "judge_timeout", "judge_retries",
            "interpret_timeout", "cache_dir", "device", "skip", "sae_chunk")
"""Options that do not change a stage's results: not part of any fingerprint."""


def effective(options: Any) -> dict[str, Any]:
    """A dataclass (or dict) as a JSON-ready dict without the :data:`VOLATILE` keys."""
    data = asdict(options) if is_dataclass(options) else dict(options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()
            if k not in VOLATILE}


def digest(value: str | Path | None) -> str | None:
    """sha256 of a file, or of a folder's files (names and contents); None for anything that is
    not a path here (a suite, a shipped rubric or an embedded model's name)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\0".encode())
        return h.hexdigest()
    return None


def fingerprint(name: str, config: dict[str, Any], reads: dict[str, str | None],
                inputs: dict[str, str | None]) -> str:
    """sha256 (16 hex) of what a stage's results depend on."""
    blob = json.dumps({"stage": name, "config": config, "reads": reads, "inputs": inputs},
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    """One stage's entry in pipeline.json."""

    status: str
    fingerprint: str | None = None
    reads: dict[str, str | None] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    seconds: float = 0.0
    """Time spent in the stage, over every attempt."""
    reason: str | None = None
    """Why it was given, unused or skipped."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Record:
    """The whole of pipeline.json."""

    run: Path
    stages: dict[str, StageRecord] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    """``config``, ``entry``, ``model``, ``sae``, ``notes``."""

    @property
    def path(self) -> Path:
        return self.run / FILE

    def save(self) -> None:
        write_json(self.path, {"schema_version": SCHEMA_VERSION, **self.meta,
                               "run": str(self.run), "updated": now(),
                               "stages": {k: asdict(v) for k, v in self.stages.items()}})


def read_record(run: Path) -> Record:
    """The run's pipeline.json, or an empty record for a new run folder."""
    path = run / FILE
    if not path.is_file():
        return Record(run)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stages = {k: StageRecord.from_dict(v) for k, v in data.get("stages", {}).items()}
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise LatentAuditError(f"{path}: not a pipeline record ({err}); move it away to run "
                               "every stage again.") from None
    meta = {k: v for k, v in data.items() if k not in ("schema_version", "run", "updated",
                                                       "stages")}
    return Record(run, stages, meta)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold ``RUN/.pipeline.lock`` while a pipeline works in ``run``: a second one started on
    the same folder is refused (a lock left by a process that died is taken over)."""
    path = run / ".pipeline.lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise LatentAuditError(f"{run} is in use by another latentaudit run (process "
                                       f"{pid}); wait for it to end, or stop it.") from None
            path.unlink(missing_ok=True)
    else:
        raise LatentAuditError(f"{path}: cannot take the run folder's lock; remove the file.")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)
