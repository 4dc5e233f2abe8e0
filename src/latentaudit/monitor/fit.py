"""``monitor fit``: a monitor file from labelled completions.

1. Check every input before the model loads: the labelled completions, the SAE (a path, a
   shipped name or ``default``) and its layer, the latents (given ids, or the top K of an
   attribution run by Δ-attribution or Δ-activation), the reductions and the recall.
2. Read each completion's mean / max activation of those latents over its tokens
   (:mod:`~latentaudit.monitor.read`).
3. Fit the logistic combination, λ chosen by prompt-held-out CV AUC
   (:mod:`~latentaudit.monitor.combine`), on every completion.
4. Threshold: the operating point of the cross-validated scores (each from a model that did not
   see its prompt) at the target recall, as a probability. On new prompts the recall is then
   about the target, not the optimistic in-sample one.
5. Write the monitor file (:mod:`~latentaudit.monitor.file`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Bool
from torch import Tensor

from latentaudit.errors import LatentAuditError
from latentaudit.logistic import L2_GRID
from latentaudit.monitor.combine import Choice, Linear, fit_chosen
from latentaudit.monitor.file import REDUCES, Monitor, sae_digest
from latentaudit.monitor.metrics import OperatingPoint, precision_at_recall
from latentaudit.monitor.read import Reductions
from latentaudit.options import whole


class Fit(NamedTuple):
    model: Linear
    choice: Choice
    point: OperatingPoint
    """Of the cross-validated scores, at the target recall (threshold on the logit)."""


def fit_scores(red: Reductions, labels: Bool[Tensor, " batch"], groups: Sequence[str],
               reduce: Sequence[str], recall: float, folds: int = 5,
               l2s: Sequence[float] = L2_GRID) -> Fit:
    """Fit on reductions that hold only the monitor's latents, in the monitor's order."""
    blocks = {"mean": red.latent_mean, "max": red.latent_max}
    x = torch.cat([blocks[r] for r in reduce], dim=1)  # (B, d_in)
    model, choice = fit_chosen(x, labels, groups, l2s, folds)
    # held-out scores are centred: add the final fit's intercept to put them on its scale
    return Fit(model, choice, precision_at_recall(choice.scores + model.intercept, labels,
                                                  recall))


def check_options(reduce: Sequence[str], recall: float) -> list[str]:
    reduce = list(reduce)
    if not reduce or any(r not in REDUCES for r in reduce) or len(set(reduce)) != len(reduce):
        raise LatentAuditError(f"--reduce must list some of {', '.join(REDUCES)} once each, "
                               f"got {reduce}.")
    if not 0 < recall <= 1:
        raise LatentAuditError(f"--recall must be in (0, 1], got {recall}.")
    return reduce


def choose_latents(run, top_k: int | None, by: str, latents: Sequence[int] | None
                   ) -> tuple[list[int], dict]:
    """The monitor's latents and where they came from."""
    if latents:
        return list(latents), {"given": list(latents)}
    if run is None or top_k is None:
        raise LatentAuditError("pass --latents, or --run with --top-k.")
    whole("top_k", top_k, 1)
    if by not in ("attribution", "activation"):
        raise LatentAuditError(f"--by must be attribution or activation, got {by!r}.")
    return run.top(top_k, by), {"run": str(run.path), "by": f"Δ-{by}", "top_k": top_k}


def run_fit(completions, out, *, run=None, top_k: int | None = None, by: str = "attribution",
            latents: Sequence[int] | None = None, model: str | None = None,
            sae: str | None = None, layer: int | None = None, reduce: Sequence[str] = ("mean",),
            recall: float = 0.9, folds: int = 5, batch_size: int = 8, device: str = "auto",
            dtype: str = "float32") -> Monitor:
    """Fit a monitor (see the module docstring) and save it at ``out``."""
    from latentaudit.models.load import load_model
    from latentaudit.monitor.evaluate import counts
    from latentaudit.monitor.inputs import check_latents, read_run, resolve
    from latentaudit.monitor.read import encode, max_len, read_labelled, read_reductions

    reduce = check_options(reduce, recall)
    out = Path(out)
    if out.is_dir():
        raise LatentAuditError(f"--out {out} is a folder: pass the monitor file to write, "
                               "e.g. monitor.safetensors.")
    r = read_run(run, layer) if run is not None else None
    ids, source = choose_latents(r, top_k, by, latents)
    model, the_sae, layer = resolve(r, model, sae, layer)
    idx = check_latents(ids, the_sae.d_sae)
    data = read_labelled(completions)
    lm = load_model(model, device=device, dtype=dtype)
    the_sae.check_fits(lm.d_model, layer, lm.name)
    the_sae.to(lm.device)
    red = read_reductions(lm, the_sae, layer, encode(lm.tokenizer, data.completions,
                                                     max_len(lm)), idx, batch_size)
    fit = fit_scores(red, data.labels, data.groups, reduce, recall, folds)
    threshold = 1 / (1 + math.exp(-fit.point.threshold))
    mon = Monitor(latents=ids, reduce=reduce, weight=fit.model.weight, bias=fit.model.bias,
                  threshold=threshold, model={"name": lm.name, "d_model": lm.d_model},
                  sae={"path": the_sae.info.source_path, "digest": sae_digest(the_sae),
                       "d_sae": the_sae.d_sae, "d_model": the_sae.d_model}, layer=layer,
                  hook=the_sae.info.hook,
                  fit={"completions": counts(data), "latents_from": source, "l2": fit.model.l2,
                       "folds": folds, "cv_auc": fit.choice.auc, "target_recall": recall,
                       "cv_precision": fit.point.precision, "cv_recall": fit.point.recall})
    mon.save(out)
    return mon
