"""Training a probe judge from labelled completions, with prompt-held-out cross-validation.

For every rubric question that has labels (a ``choice`` question; labels from human label files):

1. Every labelled completion's conversation, with the head's question after it (the rubric
   question's ``probe_question``, else one that lists its labels), is read once at every
   candidate reading: pools ``last`` and ``answer`` at a grid of layers (default: six layers
   spread over the model's depth; the forward stops after the highest).
2. Folds: the distinct prompts are split round-robin (in sorted order) into k groups; fold i
   holds out every completion of the prompts in group i, so accuracy is measured on prompts
   the probe has not seen, as when it grades a new suite.
3. Model: multinomial logistic regression on standardised features (μ, σ of the training
   part), minimising mean cross-entropy + λ‖W‖²_F by L-BFGS from zero (the objective is convex,
   so the fit is deterministic; :mod:`latentaudit.logistic`, shared with the monitor).
4. Selection, by cross-validated accuracy: the best single reading (over readings × λ grid),
   then greedily the reading that most improves it, up to ``max_readings``; a reading or a
   larger λ is only taken on a strict gain (ties keep the simpler model).
5. The chosen readings and λ are refit on every labelled completion; the file records the
   cross-validated accuracy and confusion matrix (rows: label, columns: probe).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentaudit.errors import LatentAuditError
from latentaudit.judges.base import JudgeItem
from latentaudit.judges.probe import Head, Probe, Reading, judge_prompt, read_features
from latentaudit.judges.rubrics import Question, Rubric
from latentaudit.logistic import (  # noqa: F401 (re-exported: the fit lives there)
    L2_GRID,
    cross_validate,
    fit_logistic,
    folds_by_group,
)
from latentaudit.models.load import LoadedModel
from latentaudit.options import whole

log = logging.getLogger(__name__)


def confusion(y: Int[Tensor, " N"], pred: Int[Tensor, " N"], n_classes: int) -> list[list[int]]:
    """counts[label][prediction]."""
    m = torch.zeros(n_classes, n_classes, dtype=torch.long)
    m.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return m.tolist()


@dataclass
class Selection:
    readings: list[Reading]
    l2: float
    pred: Tensor
    accuracy: float
    tried: list[tuple[str, float, float]]
    """(readings, λ, cross-validated accuracy) of every candidate evaluated."""


def select(blocks: dict[Reading, Float[Tensor, "N d"]], y: Int[Tensor, " N"], n_classes: int,
           folds: Sequence[Tensor], l2s: Sequence[float] = L2_GRID,
           max_readings: int = 2) -> Selection:
    """Greedy forward selection of readings and λ by cross-validated accuracy."""
    from latentaudit._progress import progress

    best: Selection | None = None
    tried = []
    chosen: list[Reading] = []
    n = len(blocks)
    total = sum(n - i for i in range(min(max_readings, n))) * len(l2s)
    with progress(total=total, desc="choosing readings", unit="fit") as bar:
        while len(chosen) < max_readings:
            round_best = None
            for r in blocks:
                if r in chosen:
                    continue
                x = torch.cat([blocks[c] for c in [*chosen, r]], dim=1)
                for l2 in sorted(l2s, reverse=True):
                    pred = cross_validate(x, y, n_classes, l2, folds)
                    acc = (pred == y).float().mean().item()
                    tried.append((" + ".join(map(str, [*chosen, r])), l2, acc))
                    if round_best is None or acc > round_best.accuracy:
                        round_best = Selection([*chosen, r], l2, pred, acc, tried)
                    bar.update(1)
            if round_best is None or (best is not None and round_best.accuracy <= best.accuracy):
                break
            best, chosen = round_best, round_best.readings
            log.info("probe selection: %s, l2 %g: cross-validated accuracy %.3f",
                     " + ".join(map(str, chosen)), best.l2, best.accuracy)
    assert best is not None
    return best


def check_labels(rubric: Rubric, items: Sequence[JudgeItem],
                 labels: dict[str, Sequence[str | None]], folds: int = 10,
                 max_readings: int = 2) -> None:
    """Refuse settings and labels a probe cannot be trained from, before any model is read."""
    whole("folds", folds, 2)
    whole("max_readings", max_readings, 1)
    questions = {q.name: q for q in rubric.questions}
    for name, values in labels.items():
        if name not in questions or questions[name].kind != "choice":
            what = "is a score" if name in questions else "does not exist"
            raise LatentAuditError(f"rubric '{rubric.name}' question '{name}' {what}; a probe "
                                   "learns choice questions (labels) only.")
        keep = [i for i, v in enumerate(values) if v is not None]
        seen = sorted({values[i] for i in keep})
        if len(seen) < 2:
            raise LatentAuditError(f"question '{name}': the labels hold {len(seen)} distinct "
                                   "answer(s); a probe needs examples of at least two.")
        folds_by_group([items[i].prompt_id for i in keep], folds)


def default_layers(n_layers: int, n: int = 6) -> list[int]:
    """``n`` layers spread over the depth, from a sixth of the way down to the last."""
    return sorted({round(n_layers * (i + 1) / n) - 1 for i in range(n)})


def default_question(q: Question) -> str:
    """The probe question of a rubric question: its ``probe_question``, else its labels."""
    if q.probe_question:
        return q.probe_question
    return (f"Which one word describes your reply: {', '.join(q.labels[:-1])} or "
            f"{q.labels[-1]}?")


def train_probe(lm: LoadedModel, rubric: Rubric, items: Sequence[JudgeItem],
                labels: dict[str, Sequence[str | None]], *, layers: Sequence[int] | None = None,
                folds: int = 10, max_readings: int = 2, l2s: Sequence[float] = L2_GRID,
                batch_size: int = 8) -> Probe:
    """Fit one head per question of ``labels`` ({question: label or None per item})."""
    from latentaudit.models.hooks import layer_list

    check_labels(rubric, items, labels, folds, max_readings)
    n_layers = len(layer_list(lm.model))
    layers = list(layers) if layers else default_layers(n_layers)
    bad = [n for n in layers if not 0 <= n < n_layers]
    if bad:
        raise LatentAuditError(f"--layers {bad[0]}: the model has layers 0..{n_layers - 1}.")
    candidates = [Reading(n, pool) for n in layers for pool in ("last", "answer")]
    questions = {q.name: q for q in rubric.questions}
    heads = {}
    for name, values in labels.items():
        q = questions[name]
        keep = [i for i, v in enumerate(values) if v is not None]
        y = torch.tensor([q.labels.index(values[i]) for i in keep])
        question = default_question(q)
        prompts = [judge_prompt(lm.tokenizer, items[i], question) for i in keep]
        x = read_features(lm, prompts, candidates, batch_size, desc=f"reading '{name}'")
        d = x.shape[1] // len(candidates)
        blocks = {r: x[:, j * d:(j + 1) * d] for j, r in enumerate(candidates)}
        fold_idx = folds_by_group([items[i].prompt_id for i in keep], folds)
        sel = select(blocks, y, len(q.labels), fold_idx, l2s, max_readings)
        w, b, mean, scale = fit_logistic(torch.cat([blocks[r] for r in sel.readings], 1), y,
                                         len(q.labels), sel.l2)
        cv = {"accuracy": round(sel.accuracy, 4), "n": len(keep), "folds": len(fold_idx),
              "prompts": len({items[i].prompt_id for i in keep}),
              "confusion": confusion(y, sel.pred, len(q.labels)),
              "tried": [{"readings": r, "l2": l2, "accuracy": round(a, 4)}
                        for r, l2, a in sel.tried]}
        heads[name] = Head(list(q.labels), question, sel.readings, w, b, mean, scale, sel.l2, cv)
    return Probe(model=lm.name, rubric=rubric.name, heads=heads)


def labels_from_files(items: Sequence[JudgeItem], rubric: Rubric,
                      files: Sequence[str | Path]) -> dict[str, list[str | None]]:
    """{choice question: its label per item (None where unlabelled)} from human label files.

    Rows match completions by ``key`` or by ``prompt_id`` + ``sample_index``; a completion
    labelled in two files takes the later file's label.
    """
    from latentaudit.judges.human import label_for, read_labels

    merged: dict[str, Any] = {}
    for f in files:
        merged |= read_labels(f, rubric)
    out: dict[str, list[str | None]] = {}
    for q in rubric.questions:
        if q.kind != "choice":
            continue
        values = []
        for it in items:
            v = label_for(merged, it)
            a = v.answers.get(q.name) if v is not None else None
            values.append(a.label if a is not None else None)
        if any(x is not None for x in values):
            out[q.name] = values
    if not out:
        names = ", ".join(q.name for q in rubric.questions if q.kind == "choice") or "none"
        raise LatentAuditError(
            f"--labels: no labelled completion of the completions file has a label for a choice "
            f"question of rubric '{rubric.name}' ({names}); check that the label files belong "
            "to these completions.")
    return out
