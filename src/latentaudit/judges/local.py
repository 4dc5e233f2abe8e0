"""The rubrics run by a local Hugging Face model, scored from next-token probabilities.

For each completion and rubric question:

1. The rendered template becomes one user turn through the model's chat template (raw text
   followed by ``\\nAnswer:`` when it has none; candidates then start with a space).
2. The candidate answers are the question's numbers and labels, each tokenized on its own into
   a token sequence c = (c_1..c_k). Multi-token candidates are scored exactly by walking the
   trie of candidate prefixes: the prompt runs once, its KV cache is reused to get the
   next-token distribution after every prefix (batched by prefix length), and

       p(c) = Π_j p(c_j | prompt, c_<j) · (1 − Σ_{t ∈ ext(c)} p(t | prompt, c))

   where ext(c) are the tokens that extend c into a longer candidate (e.g. "1" → "10"). The
   second factor is the probability that the answer stops at c; continuations outside the
   candidate set count as stopping.
3. The rubric's distribution rule turns p into an answer (probability-weighted score when the
   numeric mass reaches ``min_mass``, else the most likely label; see ``rubrics``).

Cost per completion and question: one forward pass of the prompt plus a few tokens per prefix
(about 12 prefixes for a 0-100 scale with a digit-by-digit tokenizer).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit.data.tokens import as_ids, prompt_ids
from latentaudit.judges.base import JudgeItem, Verdict, check_model_options
from latentaudit.judges.rubrics import Question, Rubric
from latentaudit.models.load import LoadedModel

log = logging.getLogger(__name__)


class LocalJudge:
    """Grades by a rubric with a local causal LM's next-token probabilities."""

    chunk_size = 1  # items are graded one by one anyway; keep the cache and progress current

    def __init__(self, model: LoadedModel | str, rubric: Rubric, *, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 16):
        check_model_options(device, dtype, batch_size, load=isinstance(model, str))
        if isinstance(model, str):
            from latentaudit.models.load import load_model

            model = load_model(model, device=device, dtype=dtype)
        self.lm, self.rubric, self.batch_size = model, rubric, batch_size
        self.id = f"local:{model.name}"
        tok = model.tokenizer
        self._chat = bool(getattr(tok, "chat_template", None))
        prefix = "" if self._chat else " "
        self._cands = {q.name: {c: as_ids(tok(prefix + c, add_special_tokens=False))
                                for c in q.candidates()} for q in rubric.questions}

    def grade(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts = []
        for item in items:
            v = Verdict()
            for q in self.rubric.questions:
                probs = self.candidate_probs(item, q)
                answer = q.from_probs(probs, self.rubric.min_mass)
                if answer is None:
                    v.error = (f"{v.error}; " if v.error else "") + (
                        f"{q.name}: no answer holds probability ≥ {self.rubric.min_mass} "
                        f"(candidates hold {sum(probs.values()):.3f} in all)")
                else:
                    v.answers[q.name] = answer
            verdicts.append(v)
        return verdicts

    def prompt_ids(self, text: str) -> list[int]:
        tok = self.lm.tokenizer
        if self._chat:
            return prompt_ids(tok, text)
        return as_ids(tok(text + "\nAnswer:", add_special_tokens=True))

    def candidate_probs(self, item: JudgeItem, q: Question) -> dict[str, float]:
        """p(candidate answer) for every candidate of ``q`` (see the module docstring)."""
        text = self.rubric.render(q, item.prompt_text, item.completion, item.fact)
        prompt = self.prompt_ids(text)
        cands = self._cands[q.name]
        prefixes = sorted({tuple(ids[:k]) for ids in cands.values() for k in range(len(ids))})
        logp = prefix_logprobs(self.lm.model, prompt, prefixes, self.batch_size)
        ext: dict[tuple, set[int]] = {}
        for ids in cands.values():
            for k in range(len(ids)):
                ext.setdefault(tuple(ids[:k]), set()).add(ids[k])
        probs = {}
        for cand, ids in cands.items():
            lp = sum(float(logp[tuple(ids[:k])][ids[k]]) for k in range(len(ids)))
            cont = ext.get(tuple(ids), set())
            stop = 1.0 - sum(math.exp(float(logp[tuple(ids)][t])) for t in cont) if cont else 1.0
            probs[cand] = math.exp(lp) * max(stop, 0.0)
        return probs



@torch.no_grad()
def prefix_logprobs(model: torch.nn.Module, prompt: list[int], prefixes: list[tuple[int, ...]],
                    batch_size: int = 16) -> dict[tuple[int, ...], Float[Tensor, " vocab"]]:
    """log p(next token | prompt + prefix) for every prefix; the prompt is run once.

    The prompt's KV cache is copied and repeated for each batch of equal-length prefixes, so
    the cost is one prompt forward plus a few tokens per prefix.
    """
    device = next(model.parameters()).device
    from latentaudit.generate import cache_argument, returned_cache

    arg = cache_argument(model)
    ids = torch.tensor([prompt], device=device)  # (1, P)
    out = model(input_ids=ids, position_ids=torch.arange(len(prompt), device=device)[None],
                use_cache=True)
    result = {(): torch.log_softmax(out.logits[0, -1].float(), -1).cpu()}  # (V,)
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for p in prefixes:
        if p:
            by_len.setdefault(len(p), []).append(p)
    for n, group in by_len.items():
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            cache = copy.deepcopy(returned_cache(out, arg))
            cache.batch_repeat_interleave(len(part))
            pos = torch.arange(len(prompt), len(prompt) + n, device=device)  # (L,)
            step = model(input_ids=torch.tensor(part, device=device),  # (B, L)
                         attention_mask=torch.ones(len(part), len(prompt) + n, dtype=torch.long,
                                                   device=device),
                         position_ids=pos.expand(len(part), n), use_cache=True,
                         **{arg: cache})
            logp = torch.log_softmax(step.logits[:, -1].float(), -1).cpu()  # (B, V)
            result.update(zip(part, logp, strict=True))
    return result
