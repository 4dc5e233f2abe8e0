"""Behaviour datasets: completions that do (``positive``) and don't (``negative``) show a behaviour.

Schema (JSONL, one completion per line)::

    {"prompt": "..." | [{"role": "user", "content": "..."}, ...],   # required
     "completion": "...",                                            # required
     "label": "positive" | "negative",                               # required
     "prompt_id": "...",          # optional, defaults to the prompt text (messages: their JSON)
     "score": 0.93,               # optional number (e.g. the judge's score)
     "meta": {...},               # optional object, carried along untouched
     "prompt_token_ids": [...],   # optional: the exact prompt tokens (else the prompt is tokenized,
     "completion_token_ids": [...],  #  messages through the chat template); likewise the completion
     "system": "..."}             # optional system prompt used when the prompt is rendered

Pairing happens within a prompt: every positive×negative pair (``all``), or one-to-one matched pairs
in file order (``matched``: min(#pos, #neg) pairs). A prompt with only one side is reported and
skipped. Validation collects every problem with its file, line and field before raising.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentaudit._io import read_jsonl
from latentaudit.data.tokens import message_problems
from latentaudit.errors import LatentAuditError

log = logging.getLogger(__name__)

LABELS = ("positive", "negative")
PAIRINGS = ("all", "matched")
KNOWN_FIELDS = {"prompt", "completion", "label", "prompt_id", "score", "meta",
                "prompt_token_ids", "completion_token_ids", "sample_index", "finish_reason",
                "system"}


@dataclass
class Completion:
    """One completion of a prompt with its label."""

    prompt: str | list[dict[str, str]]
    completion: str
    label: str
    prompt_id: str
    score: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    system: str | None = None
    line: int = 0
    """1-based line in the source file (0 when built in code)."""
    source: str = ""
    """The file it was read from ('' when built in code)."""

    @property
    def where(self) -> str:
        """'file:line' for error messages."""
        return f"{self.source or 'completion'}:{self.line}"

    @property
    def positive(self) -> bool:
        return self.label == "positive"


@dataclass
class Pairing:
    """Pairs of (positive index, negative index) into a completion list, and what was skipped."""

    pairs: list[tuple[int, int]]
    skipped_prompts: dict[str, str]
    """prompt_id -> why it was skipped (e.g. 'no negative completions')."""

    @property
    def used(self) -> list[int]:
        """Indices of completions that take part in at least one pair, sorted."""
        return sorted({i for pair in self.pairs for i in pair})

    def weights(self, n: int) -> list[float]:
        """Per-completion weight w_c: (#pairs as positive − #pairs as negative) / #pairs.

        Σ_c w_c x_c equals the mean over pairs of x(C+) − x(C−) for any per-completion x.
        """
        w = [0.0] * n
        if not self.pairs:
            return w
        for p, q in self.pairs:
            w[p] += 1.0
            w[q] -= 1.0
        return [x / len(self.pairs) for x in w]


def default_prompt_id(prompt: str | list) -> str:
    """The prompt text itself; chat messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def parse_row(row: Any, where: str) -> tuple[Completion | None, list[str]]:
    """Validate one decoded JSON row; return the completion or the list of problems."""
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object, got {type(row).__name__}"]
    errs: list[str] = []
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        errs.extend(message_problems(prompt, where))
    elif not isinstance(prompt, str):
        errs.append(f"{where}: field 'prompt' is required and must be a string or a list of "
                    "chat messages")
    if not isinstance(row.get("completion"), str):
        errs.append(f"{where}: field 'completion' is required and must be a string")
    label = row.get("label")
    if label not in LABELS:
        errs.append(f"{where}: field 'label' must be \"positive\" or \"negative\", got {label!r}")
    score = row.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        errs.append(f"{where}: field 'score' must be a number, got {score!r}")
    if "meta" in row and not isinstance(row["meta"], dict):
        errs.append(f"{where}: field 'meta' must be an object")
    pid = row.get("prompt_id")
    if pid is not None and not isinstance(pid, (str, int)):
        errs.append(f"{where}: field 'prompt_id' must be a string")
    for key in ("prompt_token_ids", "completion_token_ids"):
        ids = row.get(key)
        if ids is not None and not (isinstance(ids, list) and ids
                                    and all(isinstance(t, int) and t >= 0 for t in ids)):
            errs.append(f"{where}: field '{key}' must be a non-empty list of token ids")
    if row.get("system") is not None and not isinstance(row["system"], str):
        errs.append(f"{where}: field 'system' must be a string")
    if row.get("completion_token_ids") is None and row.get("completion") == "":
        errs.append(f"{where}: field 'completion' is empty: there is nothing to attribute")
    unknown = sorted(set(row) - KNOWN_FIELDS)
    if unknown:
        log.warning("%s: ignoring unknown field(s) %s (put extra data under 'meta')",
                    where, ", ".join(unknown))
    if errs:
        return None, errs
    return Completion(prompt=prompt, completion=row["completion"], label=label,
                      prompt_id=str(pid) if pid is not None else default_prompt_id(prompt),
                      score=None if score is None else float(score), meta=row.get("meta", {}),
                      prompt_token_ids=row.get("prompt_token_ids"),
                      completion_token_ids=row.get("completion_token_ids"),
                      system=row.get("system")), []


def load_behaviour(path: str | Path) -> list[Completion]:
    """Read and validate a behaviour JSONL file; one error lists every problem (file:line)."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"{path}: no such file (expected a behaviour dataset in JSONL).")
    rows = []
    for n, comp in read_jsonl(path, parse_row, "completions"):
        comp.line, comp.source = n, str(path)
        rows.append(comp)
    return rows


def load_pairs(data: str | os.PathLike | Sequence[Completion], mode: str = "all"
               ) -> tuple[list[Completion], Pairing]:
    """Read (or take) the completions and pair them; an error when there is no pair at all."""
    if isinstance(data, (str, os.PathLike)):
        completions = load_behaviour(data)
    else:
        completions = list(data)
        wrong = [i for i, c in enumerate(completions) if not isinstance(c, Completion)]
        if wrong:
            raise LatentAuditError(f"data[{wrong[0]}] is not a Completion: pass a behaviour "
                                   "JSONL path or a list of Completion objects.")
    pairing = make_pairs(completions, mode)
    if not pairing.pairs:
        raise LatentAuditError(
            "No prompt has both a positive and a negative completion, so there are no pairs to "
            "attribute; add completions with the missing label.")
    return completions, pairing


def make_pairs(completions: list[Completion], mode: str = "all") -> Pairing:
    """Pair positives with negatives of the same prompt (``all`` or ``matched``)."""
    if mode not in PAIRINGS:
        raise LatentAuditError(f"--pairing '{mode}' is not one of {', '.join(PAIRINGS)}.")
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for i, c in enumerate(completions):
        groups.setdefault(c.prompt_id, ([], []))[0 if c.positive else 1].append(i)
    pairs, skipped = [], {}
    for pid, (pos, neg) in groups.items():
        if not pos or not neg:
            skipped[pid] = "no negative completions" if pos else "no positive completions"
            continue
        if mode == "all":
            pairs.extend((p, q) for p in pos for q in neg)
        else:
            pairs.extend(zip(pos, neg, strict=False))
    for pid, why in skipped.items():
        log.warning("prompt %r skipped: %s", _short(pid), why)
    return Pairing(pairs=pairs, skipped_prompts=skipped)


def dataset_hash(path: str | Path) -> str:
    """sha256 of the dataset file's bytes."""
    h = hashlib.sha256()
    h.update(Path(path).read_bytes())
    return h.hexdigest()


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
