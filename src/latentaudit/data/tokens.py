"""Turn completions into token ids and left-padded batches.

When the tokenizer has a chat template, a string prompt is one user turn and a list of chat
messages is rendered as it is, both with the generation prompt appended (as ``latentaudit sample``
prompts the model); without a template a string prompt is raw text. A completion is tokenized
without special tokens. Exact ids given in the dataset (``prompt_token_ids`` /
``completion_token_ids``, as written by ``latentaudit sample``) win.

Batches are left-padded so every row's completion ends at the last position; position ids are
computed from the attention mask, so a padded row gives the same result as the row alone.

A chat prompt is a non-empty list of ``{"role": str, "content": str}`` messages, checked by
:func:`message_problems`. This module imports torch only to build batches, so validation stays
light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from latentaudit.errors import LatentAuditError

if TYPE_CHECKING:
    from jaxtyping import Bool, Int
    from torch import Tensor


def message_problems(prompt: Any, where: str, field: str = "prompt") -> list[str]:
    """Problems of a chat prompt (a non-empty list of {"role": str, "content": str}), each
    naming ``where`` and the field; [] when it is one."""
    if not isinstance(prompt, list) or not prompt:
        return [f"{where}: field '{field}' must be a non-empty list of chat messages"]
    return [f"{where}: field '{field}'[{j}] must be an object with string 'role' and 'content'"
            for j, m in enumerate(prompt)
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str))]


def as_ids(encoded) -> list[int]:
    """Plain token ids from whatever a tokenizer call returned (list, nested list, encoding)."""
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]], system: str | None = None,
               chat: bool = True) -> list[int]:
    """Token ids of a prompt, as the model saw it when sampling.

    With a chat template (and ``chat``), a string is one user turn and chat messages are rendered
    with the generation prompt; ``system`` is prepended unless the messages start with their own.
    Without one, a string is raw text (``system`` and a blank line before it).
    """
    has_template = chat and bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str) and not has_template:
        text = f"{system}\n\n{prompt}" if system else prompt
        return as_ids(tokenizer(text, add_special_tokens=True))
    if not has_template:
        raise LatentAuditError(
            "The prompt is a list of chat messages but the model's tokenizer has no chat "
            "template: give the prompt as a plain string instead.")
    return as_ids(tokenizer.apply_chat_template(chat_messages(prompt, system),
                                                 add_generation_prompt=True, tokenize=True))


def chat_messages(prompt: str | list[dict[str, str]],
                  system: str | None = None) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn; ``system`` is prepended unless the
    messages start with their own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def completion_ids(tokenizer, text: str) -> list[int]:
    """Token ids of completion text, without special tokens."""
    return as_ids(tokenizer(text, add_special_tokens=False))


@dataclass
class Batch:
    """A left-padded batch of prompt+completion sequences."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    completion_mask: Bool[Tensor, "batch pos"]
    """True at positions holding a completion token."""
    n_completion: int
    """Longest completion in the batch: logits are needed only for the last n_completion + 1."""

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.position_ids.to(device), self.completion_mask.to(device),
                     self.n_completion)


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Left-pad (prompt ids, completion ids) pairs into one :class:`Batch`."""
    import torch

    padded = left_pad([p + c for p, c in seqs], pad_id)
    B, T = padded.input_ids.shape
    comp = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    for b, (_, c) in enumerate(seqs):
        comp[b, T - len(c):] = True
    return Batch(padded.input_ids, padded.attention_mask, padded.position_ids, comp,
                 max(len(c) for _, c in seqs))


def is_chat_messages(value: object) -> bool:
    """Whether ``value`` is a non-empty list of ``{"role": str, "content": str}`` messages."""
    return not message_problems(value, "")


@dataclass(frozen=True)
class LeftPadded:
    """Sequences left-padded to one length; a padded row computes what it would alone."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    """1 on real tokens, 0 on padding."""
    position_ids: Int[Tensor, "batch pos"]
    """``cumsum(attention_mask) - 1``, clamped at 0 on the padding."""


def left_pad(seqs: list[list[int]], pad_id: int) -> LeftPadded:
    """Left-pad token id sequences so every row ends at the last position."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, T - len(s):] = 1
    return LeftPadded(ids, mask, (mask.cumsum(dim=1) - 1).clamp_min(0))


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length (stable), cut into batches of ``batch_size``: a
    forward pads each batch only to its own longest row."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
