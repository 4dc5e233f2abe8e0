"""The judge protocol, its verdicts, and the on-disk cache that makes a re-run free.

Every backend implements ``Judge``: an ``id`` (e.g. ``openai:gpt-4o@https://...``), the ``rubric``
it grades by, and ``grade(items) -> list[Verdict]`` (one verdict per item, same order; a failure
is a verdict with ``error`` set, never an exception for one bad item).

:func:`grade_all` wraps any judge with the cache:

1. key(item) = sha256(judge id, rubric name, rubric prompt hash, prompt, completion, fact and,
   when there is one, the system prompt);
2. items whose key is in the cache take the cached verdict (no judge call);
3. the rest are de-duplicated by key and graded in chunks; each successful verdict is appended
   to the cache at once, so a killed run loses at most one chunk;
4. failed verdicts are not cached (a re-run retries them) and are returned in the report.

The cache is an append-only JSONL file (``{"key", "judge", "rubric", "rubric_hash", "verdict"}``
per line) in the run folder; a torn last line from a killed run is skipped when read. It holds
no prompt text and no credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from latentaudit._progress import progress
from latentaudit.judges.rubrics import Answer, Rubric
from latentaudit.options import OptionError, whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeItem:
    """One completion to grade."""

    prompt: str | list[dict[str, str]]
    completion: str
    fact: str | None = None
    """The correct fact, for rubrics whose template asks for it."""
    prompt_id: str = ""
    sample_index: int | None = None
    claim: str | None = None
    """The false belief the prompt states (suites' ``meta.claim``), for claim-aware rules."""
    system: str | None = None
    """The system prompt the completion was sampled under (unless its messages hold their own)."""

    @property
    def prompt_text(self) -> str:
        """What the judge sees as the question: the user turns of the prompt."""
        if isinstance(self.prompt, str):
            return self.prompt
        turns = [m for m in self.prompt if m.get("role") != "system"]
        if len(turns) == 1:
            return turns[0]["content"]
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)

    @property
    def content_key(self) -> str:
        """sha256 (16 hex) of prompt, completion and fact: what a label is about."""
        blob = json.dumps([self.prompt, self.completion, self.fact], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Verdict:
    """A judge's answers for one completion."""

    answers: dict[str, Answer] = field(default_factory=dict)
    error: str | None = None
    """Why grading failed (then the completion is excluded); None on success."""
    outcome: str | None = None
    """An outcome set directly (a human's label), overriding the rubric's threshold rule."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"answers": {k: a.to_dict() for k, a in self.answers.items()},
                "error": self.error, "outcome": self.outcome}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(answers={k: Answer.from_dict(a) for k, a in d.get("answers", {}).items()},
                   error=d.get("error"), outcome=d.get("outcome"))


@runtime_checkable
class Judge(Protocol):
    """Anything that grades completions by a rubric."""

    id: str
    rubric: Rubric

    def grade(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


class JudgeCache:
    """Append-only JSONL cache of successful verdicts, safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, Verdict] = {}
        self.n_written = 0
        """Verdicts appended to the file by this object."""
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                try:
                    row = json.loads(line)
                    self._entries[row["key"]] = Verdict.from_dict(row["verdict"])
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    log.warning("%s:%d: skipping an unreadable cache line (a killed run?)",
                                self.path, n)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Verdict | None:
        return self._entries.get(key)

    def put(self, key: str, verdict: Verdict, judge: Judge) -> None:
        row = {"key": key, "judge": judge.id, "rubric": judge.rubric.name,
               "rubric_hash": judge.rubric.prompt_hash, "verdict": verdict.to_dict()}
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._entries[key] = verdict
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            self.n_written += 1


def cache_key(judge: Judge, item: JudgeItem) -> str:
    parts = [judge.id, judge.rubric.name, judge.rubric.prompt_hash, item.prompt,
             item.completion, item.fact] + ([item.system] if item.system else [])
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Failure:
    """One item the judge could not grade."""

    index: int
    prompt_id: str
    sample_index: int | None
    error: str


@dataclass
class JudgeRun:
    """What :func:`grade_all` did."""

    verdicts: list[Verdict]
    """One per item, in order."""
    n_cached: int
    """Items answered from the cache (no judge call)."""
    n_graded: int
    """Items the judge graded in this run (n_cached + n_graded + len(failures) = items)."""
    n_sent: int
    """Distinct items sent to the judge (a completion repeated in the input is sent once)."""
    failures: list[Failure]
    """Items the judge could not grade (sent in this run, not cached)."""


RunChunks = Callable[[list[list[JudgeItem]], Callable[[int, list[Verdict]], None]], None]
"""Grades chunks of items somewhere, handing each chunk's verdicts to the callback."""


def grade_all(judge: Judge, items: Sequence[JudgeItem], cache: JudgeCache | None = None,
              chunk: int | None = None, run_chunks: RunChunks | None = None) -> JudgeRun:
    """Grade ``items`` with ``judge``, reading and filling ``cache``; never raises per item.

    ``chunk`` (default: the judge's ``chunk_size`` attribute, else 32) items go to the judge at
    a time: the cache and the progress bar advance after each chunk. ``run_chunks(chunks,
    keep)`` grades the chunks elsewhere instead of with ``judge.grade`` (e.g. on Ray workers,
    :mod:`latentaudit.distributed.judge`), calling ``keep(chunk index, verdicts)`` for each.
    """
    chunk = chunk or getattr(judge, "chunk_size", 32)
    keys = [cache_key(judge, it) for it in items]
    verdicts: list[Verdict | None] = [None] * len(items)
    todo: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            verdicts[i] = hit
        else:
            todo.setdefault(key, []).append(i)
    n_cached = sum(v is not None for v in verdicts)
    pending = list(todo.items())
    parts = [pending[start:start + chunk] for start in range(0, len(pending), chunk)]

    def keep(k: int, got: list[Verdict]) -> None:
        if len(got) != len(parts[k]):
            raise RuntimeError(f"judge {judge.id} returned {len(got)} verdicts for "
                               f"{len(parts[k])} items")
        for (key, idx), verdict in zip(parts[k], got, strict=True):
            if verdict.ok and cache is not None:
                cache.put(key, verdict, judge)
            for i in idx:
                verdicts[i] = verdict

    chunks = [[items[idx[0]] for _, idx in part] for part in parts]
    if run_chunks is not None:
        run_chunks(chunks, keep)
    else:
        with progress(total=len(pending), desc=f"judging ({judge.id})", unit="item") as bar:
            for k, part in enumerate(chunks):
                keep(k, judge.grade(part))
                bar.update(len(part))
    failures = [Failure(i, items[i].prompt_id, items[i].sample_index, v.error)
                for i, v in enumerate(verdicts) if not v.ok]
    return JudgeRun(verdicts=verdicts, n_cached=n_cached,
                    n_graded=len(items) - n_cached - len(failures), n_sent=len(pending),
                    failures=failures)


def check_model_options(device: str | None, dtype: str, batch_size: int,
                        load: bool = True) -> None:
    """Refuse a bad ``--batch-size``, and (when a model is to be loaded) a bad ``--device`` or
    ``--dtype``, before anything is loaded."""
    whole("batch_size", batch_size, 1)
    if load:
        from latentaudit.models.load import parse_dtype, resolve_device

        parse_dtype(dtype)
        try:
            resolve_device(device)
        except RuntimeError:  # torch's own complaint about an unknown device string
            raise OptionError("device", f"{{}} {device!r} is not a device: use cpu, cuda, "
                                        "cuda:N, auto or auto-map.") from None
