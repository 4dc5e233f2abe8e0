"""The probe judge: a linear classifier on a local model's residual stream, trained from labels.

Reading one completion for a probed rubric question:

1. The conversation is rebuilt as the model saw it (the prompt's turns, the completion as the
   assistant's turn) and the head's *question* is asked as the next user turn (e.g. "Did your
   reply tell me that I am right?"), ending at the assistant header.
2. The model runs up to the highest layer the head reads. Each *reading* is the resid_post of
   one layer (0-indexed), pooled one of two ways: ``last``, the last token (where the model is
   about to answer the question); ``answer``, the mean over the completion's tokens. The
   features x are the head's readings side by side.
3. z = (x − μ) / σ (per-feature mean and standard deviation of the training set) and
   p = softmax(W z + b) over the question's labels. The rubric's distribution rule reads p as it
   reads a local judge's candidate probabilities (most likely label; score = p(score_label)).

Shapes: ``batch`` (one row per completion), ``pos``, ``d_model``, ``labels`` (the question's
labels) and ``d_in`` (the head's features: readings × d_model).

A probe file is one safetensors file: per rubric question q, ``{q}.weight`` [labels, d_in],
``{q}.bias`` [labels], ``{q}.mean`` [d_in], ``{q}.scale`` [d_in], and under the metadata key
``latentaudit_probe`` a JSON object: ``format`` ("latentaudit-probe"), ``version``, ``model``,
``rubric`` and ``questions`` ({q: {"labels", "question", "readings": [{"layer", "pool"}], "l2",
"cv"}}), where ``cv`` holds the cross-validated accuracy and confusion matrix the head was chosen
by (see :mod:`~latentaudit.judges.probe_train`). Rubric questions a probe has no head for are left
unanswered (the rubric's threshold rule then ignores conditions on them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._io import load_tagged_safetensors, named_or_file
from latentaudit.data.tokens import as_ids, chat_messages, collate, length_batches
from latentaudit.errors import LatentAuditError
from latentaudit.judges.base import JudgeItem, Verdict, check_model_options
from latentaudit.judges.rubrics import Rubric
from latentaudit.models.forward import pad_id
from latentaudit.models.hooks import run_until
from latentaudit.models.load import LoadedModel

log = logging.getLogger(__name__)

FORMAT = "latentaudit-probe"
VERSION = 1
POOLS = ("last", "answer")
_SENTINEL = "\x00"


@dataclass(frozen=True)
class Reading:
    """One feature block: resid_post of ``layer``, pooled by ``pool`` (``last`` / ``answer``)."""

    layer: int
    pool: str

    def __str__(self) -> str:
        return f"{self.pool}@{self.layer}"


@dataclass
class Head:
    """The probe for one rubric question."""

    labels: list[str]
    question: str
    """The user turn asked after the completion."""
    readings: list[Reading]
    weight: Float[Tensor, "labels d_in"]
    bias: Float[Tensor, " labels"]
    mean: Float[Tensor, " d_in"]
    scale: Float[Tensor, " d_in"]
    l2: float = 0.0
    cv: dict[str, Any] = field(default_factory=dict)

    def probs(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch labels"]:
        z = (x.float() - self.mean) / self.scale  # (B, d_in)
        return torch.softmax(z @ self.weight.T + self.bias, dim=-1)


@dataclass
class Probe:
    """A trained probe: one head per rubric question it answers, for one model."""

    model: str
    rubric: str
    heads: dict[str, Head]

    def digest(self) -> str:
        """sha256 (12 hex) of every head's questions, readings and weights."""
        h = hashlib.sha256()
        for q in sorted(self.heads):
            head = self.heads[q]
            h.update(json.dumps([q, head.labels, head.question, [str(r) for r in head.readings]])
                     .encode())
            for t in (head.weight, head.bias, head.mean, head.scale):
                h.update(t.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        from latentaudit._io import save_safetensors

        tensors, questions = {}, {}
        for q, h in self.heads.items():
            tensors |= {f"{q}.weight": h.weight, f"{q}.bias": h.bias, f"{q}.mean": h.mean,
                        f"{q}.scale": h.scale}
            questions[q] = {"labels": h.labels, "question": h.question, "l2": h.l2, "cv": h.cv,
                            "readings": [{"layer": r.layer, "pool": r.pool} for r in h.readings]}
        meta = {"format": FORMAT, "version": VERSION, "model": self.model, "rubric": self.rubric,
                "questions": questions}
        path = Path(path)
        save_safetensors(path, {k: v.float().contiguous() for k, v in tensors.items()},
                         metadata={"latentaudit_probe": json.dumps(meta)})
        return path


def probes_dir() -> Path:
    return Path(str(resources.files("latentaudit.judges") / "probes"))


def shipped_probes() -> list[str]:
    """Names of the shipped probes (each the name of the rubric it answers)."""
    return sorted(p.name.removesuffix(".safetensors") for p in probes_dir().glob("*.safetensors"))


def load_probe(name_or_path: str | Path) -> Probe:
    """Read a probe file (or a shipped probe by name), checking every field and shape."""
    path = named_or_file(name_or_path, probes_dir(), ".safetensors")
    if path is None:
        raise LatentAuditError(
            f"probe {name_or_path}: no such file, and no shipped probe has that name "
            f"(shipped: {', '.join(shipped_probes()) or 'none'}); train one with "
            "`latentaudit train-judge`.")
    meta, tensors = load_tagged_safetensors(path, "latentaudit_probe", FORMAT, "probe",
                                            "train one with `latentaudit train-judge`")
    heads = {q: _head(path, q, spec, tensors) for q, spec in meta["questions"].items()}
    return Probe(model=meta["model"], rubric=meta["rubric"], heads=heads)


def _head(path: Path, q: str, spec: dict[str, Any], tensors: dict[str, Tensor]) -> Head:
    try:
        readings = [Reading(int(r["layer"]), str(r["pool"])) for r in spec["readings"]]
        w, b = tensors[f"{q}.weight"], tensors[f"{q}.bias"]
        mean, scale = tensors[f"{q}.mean"], tensors[f"{q}.scale"]
        labels = [str(x) for x in spec["labels"]]
        question = str(spec["question"])
    except (KeyError, TypeError, ValueError) as err:
        raise LatentAuditError(f"{path}: question '{q}' is incomplete ({err}); "
                               "retrain it.") from err
    bad_pool = [r.pool for r in readings if r.pool not in POOLS]
    if bad_pool or w.shape != (len(labels), mean.numel()) or b.shape != (len(labels),) \
            or scale.shape != mean.shape:
        raise LatentAuditError(f"{path}: question '{q}' has inconsistent shapes or pools; "
                               "retrain it.")
    return Head(labels, question, readings, w.float(), b.float(), mean.float(), scale.float(),
                float(spec.get("l2", 0.0)), dict(spec.get("cv") or {}))


def judge_prompt(tokenizer, item: JudgeItem,
                 question: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the conversation the probe reads, and the completion's [start, end) span.

    The conversation is the item's prompt as chat messages (after the item's system prompt
    unless they hold their own), the completion as the assistant's turn and ``question`` as the
    next user turn, ending at the assistant header; without a chat template it is the raw text
    of the three with ``\\nAnswer:`` after the question.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LatentAuditError("the probe judge needs a fast (Rust) tokenizer for the model; "
                               "use a model folder that ships tokenizer.json.")
    if getattr(tokenizer, "chat_template", None):
        turns = chat_messages(item.prompt, item.system)
        head = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": _SENTINEL}],
                                             tokenize=False)
        full = tokenizer.apply_chat_template(
            turns + [{"role": "assistant", "content": item.completion},
                     {"role": "user", "content": question}],
            add_generation_prompt=True, tokenize=False)
        start = head.index(_SENTINEL)
    else:
        head = f"{item.system}\n\n{item.prompt_text}" if item.system else item.prompt_text
        start = len(head)
        full = f"{head}{item.completion}\n\n{question}\nAnswer:"
    end = start + len(item.completion)
    if full[start:end] != item.completion:
        raise LatentAuditError(f"{item.prompt_id} #{item.sample_index}: the chat template "
                               "changes the completion's text; the probe cannot find it.")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = as_ids(enc["input_ids"])
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not span:  # an empty completion: read the token that follows it
        span = [next((i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= start),
                     len(ids) - 1)]
    return ids, (span[0], span[-1] + 1)


@torch.no_grad()
def read_features(lm: LoadedModel, prompts: Sequence[tuple[list[int], tuple[int, int]]],
                  readings: Sequence[Reading], batch_size: int = 8,
                  desc: str | None = "probe features") -> Float[Tensor, "batch d_in"]:
    """The readings of every prompt, side by side (D = len(readings) · d_model), on the CPU.

    ``desc``: the progress bar's title; None shows no bar (the caller shows its own).
    """
    from latentaudit._progress import progress

    layers = sorted({r.layer for r in readings})
    device = next(lm.model.parameters()).device
    pad = pad_id(lm.tokenizer)
    out = []
    batches = length_batches([len(ids) for ids, _ in prompts], batch_size)
    with progress(total=len(prompts), desc=desc or "", unit="item",
                  disable=True if desc is None else None) as bar:
        for idx in batches:
            part = [prompts[i] for i in idx]
            batch = collate([(ids, []) for ids, _ in part], pad).to(device)
            acts = run_until(lm.model, layers, input_ids=batch.input_ids,
                             attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids)
            T = batch.input_ids.shape[1]
            spans = [(T - len(ids) + a, T - len(ids) + b) for ids, (a, b) in part]
            out.append(pool(acts, readings, spans).cpu())
            bar.update(len(part))
    feats = torch.cat(out)  # (B, d_in) in length order
    result = torch.empty_like(feats)
    result[torch.tensor([i for idx in batches for i in idx])] = feats
    return result


def pool(acts: dict[int, Float[Tensor, "batch pos d_model"]], readings: Sequence[Reading],
         spans: Sequence[tuple[int, int]]) -> Float[Tensor, "batch d_in"]:
    """Pool each reading from left-padded activations; ``spans`` are the answer tokens."""
    B, T = next(iter(acts.values())).shape[:2]
    device = next(iter(acts.values())).device
    pos = torch.arange(T, device=device)  # (T,)
    lo = torch.tensor([a for a, _ in spans], device=device)[:, None]  # (B, 1)
    hi = torch.tensor([b for _, b in spans], device=device)[:, None]
    weights = ((pos >= lo) & (pos < hi)).float()  # (B, T)
    weights = weights / weights.sum(1, keepdim=True)
    blocks = []
    for r in readings:
        h = acts[r.layer].float()  # (B, T, D)
        blocks.append(h[:, -1] if r.pool == "last" else torch.einsum("bt,btd->bd", weights, h))
    return torch.cat(blocks, dim=-1)


class ProbeJudge:
    """Grades by a rubric with a trained probe on a local model (see the module docstring)."""

    chunk_size = 32

    def __init__(self, probe: Probe | str | Path, rubric: Rubric, *, model: LoadedModel | str |
                 None = None, device: str = "auto", dtype: str = "float32", batch_size: int = 8):
        spec = None if isinstance(probe, Probe) else str(probe)
        self.probe = probe if isinstance(probe, Probe) else load_probe(probe)
        names = {x.name for x in rubric.questions}
        if self.probe.rubric != rubric.name or not set(self.probe.heads) <= names:
            raise LatentAuditError(
                f"--judge probe:{spec or self.probe.rubric}: the probe was trained for rubric "
                f"'{self.probe.rubric}' (questions {', '.join(self.probe.heads)}), not for "
                f"'{rubric.name}'; pass --rubric {self.probe.rubric}.")
        self._questions = {q.name: q for q in rubric.questions if q.name in self.probe.heads}
        for name, q in self._questions.items():
            if set(q.labels) != set(self.probe.heads[name].labels):
                raise LatentAuditError(
                    f"--judge probe:{spec or self.probe.rubric}: question '{name}' has labels "
                    f"{', '.join(q.labels)} in this rubric but the probe learned "
                    f"{', '.join(self.probe.heads[name].labels)}; retrain it with "
                    "`latentaudit train-judge`.")
        check_model_options(device, dtype, batch_size, load=not isinstance(model, LoadedModel))
        if model is None or isinstance(model, str):
            from latentaudit.models.load import load_model

            model = load_model(model or self.probe.model, device=device, dtype=dtype)
        self.lm, self.rubric, self.batch_size = model, rubric, batch_size
        self.id = f"probe:{self.probe.rubric}#{self.probe.digest()}@{model.name}"

    def grade(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts = [Verdict() for _ in items]
        for name, q in self._questions.items():
            head = self.probe.heads[name]
            prompts = [judge_prompt(self.lm.tokenizer, it, head.question) for it in items]
            x = read_features(self.lm, prompts, head.readings, self.batch_size, desc=None)
            for v, p in zip(verdicts, head.probs(x), strict=True):
                probs = dict(zip(head.labels, p.tolist(), strict=True))
                answer = q.from_probs(probs, self.rubric.min_mass)
                if answer is not None:
                    answer.raw = "probe"
                    v.answers[name] = answer
        return verdicts
