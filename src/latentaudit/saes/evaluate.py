"""Evaluate SAEs on held-out text: reconstruction over many tokens, model damage over a few.

1. Text -> packed token sequences of ``context_len`` (:func:`~latentaudit.saes.harvest.
   token_sequences`), at most ``tokens`` evaluated positions in all:
   - ``held-out``: the held-out split of the default training mix (documents never trained on);
   - ``outside``: prose books kept outside the training mix (``corpus.OUTSIDE_BOOKS``), an equal
     share of sequences from each, read from the start of the book;
   - a path: the user's ``.txt`` / ``.jsonl`` files, all of them;
   - a ``latentaudit sample`` output (JSONL rows with ``prompt_token_ids`` and
     ``completion_token_ids``): each completion with its prompt as one sequence, in the chat
     format the model saw it, not packed; so an SAE is read on a model's own replies (e.g. a
     fine-tune's against its base model's, with the base model's SAE).
2. :func:`~latentaudit.saes.metrics.evaluate_saes` on each text: one pass up to layer L per
   batch for FVU, L0 and the latents that never fire, over every token; the CE-loss increase
   (clean, SAE spliced in, mean-ablated) over the first ``ce_tokens`` only, since it costs two or
   more full forwards per sequence.
3. One row per (SAE, text): the numbers and how many tokens each rests on.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from latentaudit.data.corpus import OUTSIDE_BOOKS, load_corpus
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import pad_id
from latentaudit.models.load import LoadedModel
from latentaudit.saes.harvest import token_sequences
from latentaudit.saes.metrics import Evaluation, evaluate_saes
from latentaudit.saes.sae import SAE

TEXTS = ("held-out", "outside")
"""Built-in evaluation texts (step 1 of the module docstring)."""


@dataclass(frozen=True)
class EvalConfig:
    """How much text an SAE is evaluated on."""

    tokens: int = 100_000
    """Evaluated positions per text for FVU, L0 and dead latents."""
    ce_tokens: int = 4096
    """Positions per text for the CE-loss increase (the first sequences)."""
    context_len: int = 128
    """Tokens per packed sequence, BOS included."""
    skip_first: int = 1
    """Positions left out at the start of every sequence (BOS / attention sink)."""
    batch_size: int = 16
    """Sequences per forward pass."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.ce_tokens < 0 or self.batch_size < 1:
            raise LatentAuditError("--tokens and --batch-size must be positive and --ce-tokens "
                                   ">= 0.")
        if not 0 <= self.skip_first < self.context_len - 1:
            raise LatentAuditError(f"--context-len {self.context_len} must leave at least two "
                                   f"positions after skip_first={self.skip_first}.")

    @property
    def per_sequence(self) -> int:
        return self.context_len - self.skip_first


def text_documents(text: str | os.PathLike) -> list[Iterable[str]]:
    """Document streams of one evaluation text: one stream per book for ``outside``."""
    if str(text) == "held-out":
        return [(d.text for d in load_corpus(None, split="held_out"))]
    if str(text) == "outside":
        books = {d.doc_id: d.text for d in load_corpus(["gutenberg"])}
        missing = [b for b in OUTSIDE_BOOKS if b not in books]
        if missing:
            raise LatentAuditError(f"the outside text lacks {', '.join(missing)}: run "
                                   "`latentaudit data fetch --sources gutenberg`.")
        return [[books[b]] for b in OUTSIDE_BOOKS]
    return [(d.text for d in load_corpus([text]))]


def completion_sequences(path: str | os.PathLike, cfg: EvalConfig) -> list[list[int]] | None:
    """Prompt + completion token ids of a ``latentaudit sample`` file, up to about
    ``cfg.tokens`` evaluated positions; None when ``path`` is not such a file."""
    from latentaudit._io import iter_json_lines

    if not str(path).endswith(".jsonl") or not os.path.isfile(path):
        return None
    seqs, positions = [], 0
    for line, row in iter_json_lines(path):
        if isinstance(row, ValueError) and seqs:
            raise LatentAuditError(f"{path}:{line}: not valid JSON ({row.msg}).")
        ids = row.get("completion_token_ids") if isinstance(row, dict) else None
        if ids is None:
            if not seqs:
                return None  # a text corpus file
            raise LatentAuditError(f"{path}:{line}: field 'completion_token_ids' is missing, "
                                   "though earlier rows have it: pass a `latentaudit sample` "
                                   "output.")
        seq = list(row.get("prompt_token_ids") or []) + list(ids)
        if len(seq) > cfg.skip_first + 1:
            seqs.append(seq)
            positions += len(seq) - cfg.skip_first
        if positions >= cfg.tokens:
            break
    return seqs


def text_sequences(text: str | os.PathLike, tokenizer, cfg: EvalConfig) -> list[list[int]]:
    """Packed sequences of ``text`` covering about ``cfg.tokens`` positions (step 1); a sample
    file's completions as they are."""
    own = completion_sequences(text, cfg)
    if own is not None:
        if not own:
            raise LatentAuditError(f"{text}: no completion to evaluate on.")
        return own
    streams = text_documents(text)
    n = -(-cfg.tokens // cfg.per_sequence)  # sequences in all
    per = [n // len(streams) + (i < n % len(streams)) for i in range(len(streams))]
    seqs = [s for docs, k in zip(streams, per, strict=True)
            for s in itertools.islice(token_sequences(docs, tokenizer, cfg.context_len), k)]
    if not seqs:
        raise LatentAuditError(f"evaluation text '{text}' holds no sequence of "
                               f"{cfg.context_len} tokens.")
    return seqs


@dataclass(frozen=True)
class TextEvaluation:
    """One SAE on one text."""

    sae: str
    text: str
    evaluation: Evaluation

    def row(self) -> dict:
        ev = self.evaluation
        return {"sae": self.sae, "text": self.text, "fvu": ev.fvu, "l0": ev.l0,
                "dead_fraction": ev.dead_fraction, "tokens": ev.tokens,
                "ce_clean": ev.ce.clean, "ce_spliced": ev.ce.spliced,
                "ce_mean_ablated": ev.ce.ablated, "ce_increase": ev.ce.increase,
                "ce_increase_pct": ev.ce.increase_pct, "ce_tokens": ev.ce_tokens}


def evaluate_on_texts(loaded: LoadedModel, saes: dict[str, SAE], layer: int,
                      texts: Sequence[str | os.PathLike], cfg: EvalConfig,
                      mean_activation: Float[Tensor, " d_model"]) -> list[TextEvaluation]:
    """Every SAE (all at ``layer``) on every text (steps 2-3); ā for the mean ablation."""
    pad = pad_id(loaded.tokenizer)
    out = []
    for text in texts:
        seqs = text_sequences(text, loaded.tokenizer, cfg)
        ce_sequences = -(-cfg.ce_tokens // cfg.per_sequence)
        evs = evaluate_saes(loaded.model, list(saes.values()), seqs, layer, mean_activation,
                            skip_first=cfg.skip_first, batch_size=cfg.batch_size, pad_id=pad,
                            ce_sequences=ce_sequences)
        out += [TextEvaluation(name, str(text), ev) for name, ev in zip(saes, evs, strict=True)]
    return out
