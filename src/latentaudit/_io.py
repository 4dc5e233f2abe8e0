"""Atomic file writes, so a run killed midway never leaves a half-written artifact.

Each writer writes to a temporary file in the destination folder, flushes it to disk and renames
it over the destination (``os.replace`` is atomic on POSIX and Windows). The result gets the
permissions a plainly created file would (0666 less the umask), not the temporary file's 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from latentaudit.errors import LatentAuditError


def named_or_file(name_or_path: str | os.PathLike, folder: Path, suffix: str) -> Path | None:
    """``name_or_path`` if it is a file, else the shipped ``folder/<name><suffix>``, else None."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = folder / f"{name_or_path}{suffix}"
    return shipped if shipped.is_file() else None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(f: IO[str], rows: Iterable[dict]) -> None:
    """Append rows to an open append-only JSONL file and fsync them: a kill cuts at most the
    line being written (:func:`complete_lines` drops it on the next read)."""
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    f.flush()
    os.fsync(f.fileno())


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically (tensors made contiguous on CPU)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tagged_safetensors(path: Path, key: str, fmt: str, what: str, fix: str,
                            where: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors) of a safetensors file whose metadata ``key`` holds a JSON object of
    ``format`` ``fmt`` (a probe, a monitor); ``what`` names the kind in errors, ``fix`` says how
    to make one and ``where`` prefixes the path (e.g. the flag that named it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise LatentAuditError(f"{where}{path}: not a readable safetensors file ({err}).") \
            from err
    try:
        meta = json.loads(raw or "")
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise LatentAuditError(f"{where}{path}: not a latentaudit {what} (no '{key}' "
                               f"metadata); {fix}.")
    return meta, tensors


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_problem(err: json.JSONDecodeError) -> str:
    """What is wrong and where, e.g. "Expecting ',' delimiter at column 17" (1-based column;
    the line too when the text spans several)."""
    line = f"line {err.lineno}, " if err.doc.count("\n") else ""
    return f"{err.msg} at {line}column {err.colno}"


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(1-based line, decoded JSON or the :class:`json.JSONDecodeError`) of each non-blank line,
    streamed: the caller decides whether a bad line is an error or a row to skip."""
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as err:
                yield n, err


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any, str], tuple[Any, list[str]]],
               what: str = "rows", unique: tuple[str, Callable[[Any], Any]] | None = None
               ) -> list[tuple[int, Any]]:
    """Parse every line of a JSONL file with ``parse(obj, "file:line")`` -> (item | None, problems).

    Every problem of the whole file (bad JSON included) is collected and raised as one
    :class:`~latentaudit.errors.LatentAuditError` listing ``file:line: ...``; returns
    (1-based line, item) for each parsed line. Blank lines are skipped. ``unique`` = (field name,
    key function) reports items whose key repeats an earlier line's.
    """

    items, errs, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                errs.append(f"{where}: not valid JSON ({json_problem(err)})")
                continue
            item, problems = parse(obj, where)
            errs.extend(problems)
            if item is None or problems:
                continue
            if unique:
                key = unique[1](item)
                if key in seen:
                    errs.append(f"{where}: {unique[0]} {key!r} repeats line {seen[key]}")
                    continue
                seen[key] = n
            items.append((n, item))
    if errs:
        shown = errs[:20] + ([f"... and {len(errs) - 20} more"] if len(errs) > 20 else [])
        raise LatentAuditError(f"{path} has {len(errs)} problem(s); fix them and rerun:\n  "
                               + "\n  ".join(shown))
    if not items:
        raise LatentAuditError(f"{path}: the file holds no {what}.")
    return items


def complete_lines(path: str | os.PathLike) -> list[bytes]:
    """The complete lines of an append-only file; a torn last line (a write cut short by a
    kill) is cut off the file, with a warning, so appending can go on."""
    with open(path, "rb+") as f:
        data = f.read()
        good = data.rfind(b"\n") + 1
        if good < len(data):
            logging.getLogger(__name__).warning(
                "%s: dropping a torn last line (an interrupted write)", path)
            f.truncate(good)
    return data[:good].splitlines()
