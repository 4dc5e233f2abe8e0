"""Turn completions into token ids and left-padded batches.

A prompt that is a string is tokenized as raw text (with the tokenizer's special tokens, e.g. BOS);
a list of chat messages goes through the tokenizer's chat template with the generation prompt
appended. A completion is tokenized without special tokens. Exact ids given in the dataset
(``prompt_token_ids`` / ``completion_token_ids``, as written by ``latentaudit sample``) win.

Batches are left-padded so every row's completion ends at the last position; position ids are
computed from the attention mask, so a padded row gives the same result as the row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from latentaudit.errors import LatentAuditError


def _as_ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]], system: str | None = None
               ) -> list[int]:
    """Token ids of a prompt: raw text, or chat messages through the chat template."""
    if isinstance(prompt, str):
        return _as_ids(tokenizer(prompt, add_special_tokens=True))
    messages = ([{"role": "system", "content": system}] if system else []) + list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise LatentAuditError(
            "The prompt is a list of chat messages but the model's tokenizer has no chat "
            "template: give the prompt as a plain string instead.")
    return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True))


def completion_ids(tokenizer, text: str) -> list[int]:
    """Token ids of completion text, without special tokens."""
    return _as_ids(tokenizer(text, add_special_tokens=False))


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
    lengths = [len(p) + len(c) for p, c in seqs]
    T = max(lengths)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)
    comp = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[b, T - n:] = torch.tensor(p + c, dtype=torch.long)
        mask[b, T - n:] = 1
        comp[b, T - len(c):] = True
    position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, T)
    return Batch(ids, mask, position_ids, comp, max(len(c) for _, c in seqs))
