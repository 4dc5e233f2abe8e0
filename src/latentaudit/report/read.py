"""Read the files of a run folder for the report: JSON, JSONL and safetensors, without torch.

Every reader names the file (and line) of a problem and says what to do; a missing optional
file is ``None``, never an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentaudit._io import iter_json_lines, json_problem
from latentaudit.errors import LatentAuditError


def read_json(path: Path, fix: str) -> Any:
    """The JSON content of ``path``; ``fix`` says how to get a good file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}: not valid JSON ({json_problem(err)}); {fix}") from None
    except OSError as err:
        raise LatentAuditError(f"{path}: cannot be read ({err.strerror}); {fix}") from None


def read_json_if(path: Path, fix: str) -> Any | None:
    """``read_json`` of ``path``, or None when there is no such file."""
    return read_json(path, fix) if path.is_file() else None


def iter_jsonl(path: Path, fix: str):
    """Yield (line number, object) of each non-blank line of ``path``."""
    for n, obj in iter_json_lines(path):
        if isinstance(obj, json.JSONDecodeError):
            raise LatentAuditError(f"{path}:{n}: not valid JSON ({json_problem(obj)}); {fix}")
        yield n, obj


def read_jsonl(path: Path, fix: str, need: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every object of a JSONL file; each must be an object holding the fields in ``need``."""
    rows = []
    for n, obj in iter_jsonl(path, fix):
        missing = [k for k in need if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise LatentAuditError(f"{path}:{n}: field '{missing[0]}' is missing; {fix}")
        rows.append(obj)
    return rows


def read_jsonl_if(path: Path, fix: str, need: tuple[str, ...] = ()) -> list[dict] | None:
    """``read_jsonl`` of ``path``, or None when there is no such file."""
    return read_jsonl(path, fix, need) if path.is_file() else None


def read_tensors(path: Path, fix: str, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The arrays of a safetensors file (only ``names`` when given, those it has) as numpy
    arrays, without importing torch."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            keys = [k for k in f.keys() if names is None or k in names]
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise LatentAuditError(f"{path}: not a readable safetensors file ({err}); {fix}") from None
