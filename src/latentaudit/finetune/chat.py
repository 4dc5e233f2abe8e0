"""Chat JSONL for fine-tuning: read, check, and tokenize with a mask over the assistant's tokens.

A row is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (other
keys are kept but unused), with at least one assistant message.

Tokenization (:func:`tokenize_chat`), for any chat template:

1. Render the whole conversation with the model's chat template (text, not ids).
2. For each assistant message i, render messages[:i] with the generation prompt: that text must
   be a prefix of the whole (else the template rewrites earlier turns and the mask would be
   wrong: an error). The assistant's span runs from the end of that prefix to the end of the
   rendering of messages[:i + 1], so it holds the reply and the template's end-of-turn marker.
3. Tokenize the whole text once (no added special tokens: the template writes its own), with
   character offsets; a token is a target when it starts inside an assistant span.
4. Cut to ``max_length`` tokens; a row with no target left is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentaudit._io import read_jsonl
from latentaudit.errors import LatentAuditError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Tokenized:
    """One conversation as token ids and its loss mask."""

    input_ids: list[int]
    target: list[bool]
    """True where the token is the assistant's (the loss is taken there only)."""


def check_row(row: object, where: str) -> list[dict[str, str]]:
    """The row's messages, or one error naming ``where`` (file:line) and the field."""
    if not isinstance(row, dict) or "messages" not in row:
        raise LatentAuditError(f"{where}: a row must be an object with 'messages' (a list of "
                               "{'role', 'content'} objects).")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise LatentAuditError(f"{where}: field 'messages' must be a non-empty list.")
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise LatentAuditError(f"{at} must be an object with 'role' and 'content'.")
        if m.get("role") not in ROLES:
            raise LatentAuditError(f"{at}.role must be one of {', '.join(ROLES)}, "
                                   f"got {m.get('role')!r}.")
        if not isinstance(m.get("content"), str):
            raise LatentAuditError(f"{at}.content must be a string.")
    if not any(m["role"] == "assistant" for m in messages):
        raise LatentAuditError(f"{where}: 'messages' has no assistant message to learn from.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_chat(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of a chat JSONL file, checked; every problem of the file is reported
    at once, each naming file:line and the field."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"--data {path}: no such file.")

    def parse(obj: object, where: str) -> tuple[list[dict[str, str]] | None, list[str]]:
        try:
            return check_row(obj, where), []
        except LatentAuditError as err:
            return None, [str(err)]

    return [messages for _, messages in read_jsonl(path, parse, what="conversations")]


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the assistant turns (steps 1-2)."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:i], True) if i else ""
        end = render(messages[: i + 1], False)
        if not (text.startswith(start) and text.startswith(end) and len(end) > len(start)):
            raise LatentAuditError(
                "the model's chat template renders earlier turns differently once a later turn "
                "is added, so the assistant's tokens cannot be located; use a model whose "
                "template keeps earlier turns unchanged, or one assistant turn per row.")
        spans.append((len(start), len(end)))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> Tokenized | None:
    """Token ids and the assistant mask of one conversation (None: no target within
    ``max_length``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LatentAuditError("fine-tuning needs a fast tokenizer (character offsets) for the "
                               "assistant mask; this model's tokenizer is a slow one.")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_length]
    offsets = list(enc["offset_mapping"])[:max_length]
    target = [any(a <= s < b for a, b in spans) for s, _ in offsets]
    if not any(target):
        return None
    return Tokenized(input_ids=ids, target=target)
