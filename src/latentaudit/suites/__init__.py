"""Built-in behaviour suites (prompts to sample from) and the prompts-file loader.

Format (JSONL, one prompt per line)::

    {"prompt_id": "fb-001-...",     # required, unique
     "prompt": "...",               # required: a string (or a list of chat messages)
     "system": "...",               # optional system prompt
     "fact": "...",                 # optional: the correct fact, for the false-belief judge
     "meta": {"topic": "health"}}   # optional object, carried through sampling and judging

``fact`` and any other top-level field are moved into ``meta`` (where the sampler carries them
into ``completions.jsonl`` and the judge reads ``meta.fact``).

Shipped suites:
- ``false-belief``: a user confidently states a common misconception and asks the assistant to
  agree (ten phrasings in turn: "..., right?", "I'm pretty sure ... Am I right?", ...);
  ``fact`` holds the correct fact and ``meta.claim`` the false claim. Topics: health, animals,
  food, science, history, geography, language, technology and programming. Asking for agreement
  (rather than for help that presupposes the claim) leaves a small model room to go either
  way, so one prompt yields both validating and correcting completions to pair.
- ``broad-misalignment``: open-ended questions that invite a model to reveal its values
  (wishes, power, money, relationships, society, AIs and humans).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from latentaudit._io import named_or_file, read_jsonl
from latentaudit.data.tokens import is_chat_messages
from latentaudit.errors import LatentAuditError

FIELDS = ("prompt_id", "prompt", "system", "meta")


@dataclass
class SuitePrompt:
    """One prompt of a suite."""

    prompt_id: str
    prompt: str | list[dict[str, str]]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra data (``fact``, ``topic``, ...), carried into the completions."""

    @property
    def fact(self) -> str | None:
        return self.meta.get("fact")


def suites_dir() -> Path:
    return Path(str(resources.files("latentaudit") / "suites"))


def list_suites() -> list[str]:
    """Names of the shipped suites."""
    return sorted(p.stem for p in suites_dir().glob("*.jsonl"))


def load_prompts(name_or_path: str | Path) -> list[SuitePrompt]:
    """A shipped suite by name, or a user's JSONL prompts file; validated, ids unique."""
    path = named_or_file(name_or_path, suites_dir(), ".jsonl")
    if path is None:
        raise LatentAuditError(
            f"{name_or_path}: no such prompts file and no built-in suite of that name; "
            f"built-in suites are {', '.join(list_suites())}.")
    prompts = [p for _, p in read_jsonl(path, _parse, "prompts",
                                        unique=("prompt_id", lambda p: p.prompt_id))]
    return prompts


def _parse(row: Any, where: str) -> tuple[SuitePrompt | None, list[str]]:
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object"]
    errs = []
    pid, prompt, system = row.get("prompt_id"), row.get("prompt"), row.get("system")
    if not isinstance(pid, str) or not pid.strip():
        errs.append(f"{where}: field 'prompt_id' is required and must be a non-empty string")
    if not ((isinstance(prompt, str) and prompt.strip()) or is_chat_messages(prompt)):
        errs.append(f"{where}: field 'prompt' is required: a non-empty string (or a list of "
                    "{'role', 'content'} chat messages)")
    if system is not None and not isinstance(system, str):
        errs.append(f"{where}: field 'system' must be a string")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        errs.append(f"{where}: field 'meta' must be an object")
    fact = row.get("fact", (meta or {}).get("fact") if isinstance(meta, dict) else None)
    if fact is not None and (not isinstance(fact, str) or not fact.strip()):
        errs.append(f"{where}: field 'fact' must be a non-empty string")
    if errs:
        return None, errs
    extra = {k: v for k, v in row.items() if k not in FIELDS}
    return SuitePrompt(prompt_id=pid, prompt=prompt, system=system, meta={**meta, **extra}), []
