"""How well latents detect the behaviour on held-out completions, against baselines.

1. Latent sets: the top K of an attribution run by Δ-attribution and by Δ-activation, latents
   given by id, and ``random_draws`` sets of K latents drawn uniformly (seeded) from the latents
   no other set of size K holds (:func:`latentaudit.attribution.select.random_latents`).
2. Every completion of the evaluation file (prompts not used for attribution) is read once:
   each latent's mean and max activation over its tokens and the mean residual
   (:mod:`~latentaudit.monitor.read`; cached on disk).
3. Per latent: the mean (and the max) activation as a score, no fitting: ROC AUC with a
   prompt-level bootstrap interval and precision at the chosen recall
   (:mod:`~latentaudit.monitor.metrics`).
4. Per set: a logistic combination of the K mean activations; the residual probe: a logistic
   regression on the mean residual (d_model inputs, the ceiling). Both measured by nested
   prompt-held-out cross-validation on the evaluation file (``cv``) and, when a training file
   is given, fit on it and scored on the evaluation file (``transfer``)
   (:mod:`~latentaudit.monitor.combine`).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentaudit.attribution.select import random_latents
from latentaudit.errors import LatentAuditError
from latentaudit.monitor.combine import nested_scores, transfer_scores
from latentaudit.monitor.metrics import (
    bootstrap_ci,
    bootstrap_indices,
    precision_at_recall,
    roc_auc,
    roc_curve,
)
from latentaudit.monitor.read import Labelled, Reductions
from latentaudit.options import OptionError, whole

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METHODS = ("Δ-attribution", "Δ-activation", "given", "random")


@dataclass
class EvalConfig:
    """Options of ``latentaudit monitor evaluate``."""

    top_k: tuple[int, ...] = (10, 20)
    """Sizes K of the latent sets (the top K of each ranking; K random latents)."""
    recall: float = 0.8
    """The recall at which precision is reported."""
    folds: int = 5
    """Prompt-held-out folds of the cross-validation (outer and inner)."""
    bootstrap: int = 1000
    """Resamples of whole prompts for the confidence intervals."""
    level: float = 0.95
    """Confidence level of the intervals."""
    random_draws: int = 10
    """Sets of K random latents per K."""
    seed: int = 0
    """Seed of the random latents and of the bootstrap."""
    batch_size: int = 8
    """Completions per forward pass."""

    def __post_init__(self) -> None:
        self.top_k = tuple(self.top_k)
        if not self.top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                 for k in self.top_k):
            raise OptionError("top_k", f"{{}} must be whole numbers ≥ 1, got {list(self.top_k)}.")
        if not 0 < self.recall <= 1:
            raise OptionError("recall", f"{{}} must be in (0, 1], got {self.recall}.")
        if not 0 < self.level < 1:
            raise OptionError("level", f"{{}} must be in (0, 1), got {self.level}.")
        for name, low in (("folds", 2), ("bootstrap", 1), ("random_draws", 0),
                          ("batch_size", 1)):
            whole(name, getattr(self, name), low)


class LatentSet(NamedTuple):
    method: str
    k: int
    latents: list[int]


def latent_sets(cfg: EvalConfig, d_sae: int, run=None, given: list[int] | None = None
                ) -> list[LatentSet]:
    """The sets to measure: each ranking's top K, the given latents, random draws."""
    sets = []
    for k in cfg.top_k:
        if run is not None:
            sets.append(LatentSet("Δ-attribution", k, run.top(k, "attribution")))
            if run.delta_activation is not None:
                sets.append(LatentSet("Δ-activation", k, run.top(k, "activation")))
        chosen = {i for s in sets if s.k == k for i in s.latents} | set(given or ())
        gen = torch.Generator().manual_seed(cfg.seed + k)
        sets += [LatentSet("random", k, random_latents(d_sae, k, chosen, gen))
                 for _ in range(cfg.random_draws)]
    if given:
        sets.append(LatentSet("given", len(given), list(given)))
    return sets


def summary(scores: Float[Tensor, " batch"], labels: Bool[Tensor, " batch"],
            resamples: list[Tensor], cfg: EvalConfig) -> dict[str, float]:
    """AUC, its bootstrap interval and the operating point at the chosen recall."""
    ci = bootstrap_ci(roc_auc, scores, labels, resamples, cfg.level)
    op = precision_at_recall(scores, labels, cfg.recall)
    return {"auc": roc_auc(scores, labels), "ci_low": ci.low, "ci_high": ci.high,
            "precision": op.precision, "recall": op.recall, "threshold": op.threshold}


def per_latent(red: Reductions, labels: Bool[Tensor, " batch"], latents: list[int],
               resamples: list[Tensor] | None, cfg: EvalConfig) -> list[dict[str, Any]]:
    """Each latent's mean and max activation as a score (intervals when ``resamples``)."""
    rows = []
    for rank, i in enumerate(latents, start=1):
        row: dict[str, Any] = {"rank": rank, "latent": i,
                               "fires": int((red.latent_max[:, i] > 0).sum())}
        for name, values in (("mean", red.latent_mean[:, i]), ("max", red.latent_max[:, i])):
            if resamples is None:
                row[name] = {"auc": roc_auc(values, labels)}
            else:
                row[name] = summary(values, labels, resamples, cfg)
        rows.append(row)
    return rows


class Split(NamedTuple):
    """One labelled file and its reductions."""

    data: Labelled
    red: Reductions


def combination(x_eval: Float[Tensor, "batch d_in"], ev: Split,
                x_train: Float[Tensor, "train d_in"] | None, train: Split | None,
                resamples: list[Tensor], cfg: EvalConfig) -> dict[str, Any]:
    """A logistic combination measured by nested CV and, with a training file, by transfer."""
    out: dict[str, Any] = {}
    y, groups = ev.data.labels, ev.data.groups
    scores = {"cv": nested_scores(x_eval, y, groups, folds=cfg.folds)}
    if train is not None and x_train is not None:
        scores["transfer"] = transfer_scores(x_train, train.data.labels, train.data.groups,
                                             x_eval, folds=cfg.folds)
    for mode, s in scores.items():
        curve = roc_curve(s, y)
        out[mode] = {**summary(s, y, resamples, cfg),
                     "roc": {"fpr": curve.fpr.tolist(), "tpr": curve.tpr.tolist()}}
    return out


def _set_result(s: LatentSet, ev: Split, train: Split | None, resamples: list[Tensor],
                cfg: EvalConfig) -> dict[str, Any]:
    idx = torch.tensor(s.latents)
    x_train = train.red.latent_mean[:, idx] if train is not None else None
    latents = per_latent(ev.red, ev.data.labels, s.latents,
                         None if s.method == "random" else resamples, cfg)
    return {"method": s.method, "k": s.k, "latents": s.latents, "per_latent": latents,
            "median_auc_mean": statistics.median(r["mean"]["auc"] for r in latents),
            "median_auc_max": statistics.median(r["max"]["auc"] for r in latents),
            "combination": combination(ev.red.latent_mean[:, idx], ev, x_train, train,
                                       resamples, cfg)}


def evaluate(ev: Split, sets: list[LatentSet], cfg: EvalConfig,
             train: Split | None = None) -> dict[str, Any]:
    """Every set's per-latent and combined detection, and the residual probe."""
    from latentaudit._progress import progress

    resamples = bootstrap_indices(ev.data.groups, cfg.bootstrap, cfg.seed)
    results = []
    with progress(total=len(sets) + 1, desc="measuring detection", unit="set") as bar:
        for s in sets:
            results.append(_set_result(s, ev, train, resamples, cfg))
            bar.update(1)
        probe = combination(ev.red.resid_mean, ev, None if train is None
                            else train.red.resid_mean, train, resamples, cfg)
        bar.update(1)
    return {"sets": results, "probe": probe, "counts": counts(ev.data),
            "train_counts": counts(train.data) if train is not None else None}


def counts(data: Labelled) -> dict[str, Any]:
    n_pos = int(data.labels.sum())
    return {"path": str(data.path), "sha256": data.sha256, "completions": len(data.labels),
            "positive": n_pos, "negative": len(data.labels) - n_pos, "excluded": data.excluded,
            "prompts": len(set(data.groups))}


def run_evaluation(completions, out, cfg: EvalConfig, *, run=None, latents=None, train=None,
                   model: str | None = None, sae: str | None = None, layer: int | None = None,
                   device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """Check every input, read the completions and write the evaluation into ``out``."""
    from pathlib import Path

    from latentaudit.models.load import load_model
    from latentaudit.monitor.file import sae_digest
    from latentaudit.monitor.inputs import (
        check_held_out,
        check_latents,
        read_run,
        resolve,
    )
    from latentaudit.monitor.read import read_cached, read_labelled
    from latentaudit.monitor.report import write_evaluation

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LatentAuditError(f"--out {out} is a file: pass a folder.")
    if run is None and not latents:
        raise LatentAuditError("pass --run (an attribution run, for its top-K latents) or "
                               "--latents, or both.")
    r = read_run(run, layer) if run is not None else None
    model, the_sae, layer = resolve(r, model, sae, layer)
    if latents:
        check_latents(list(latents), the_sae.d_sae)
    ev_data = read_labelled(completions)
    tr_data = read_labelled(train, "--train") if train is not None else None
    if r is not None:
        check_held_out(r.prompts(), ev_data.groups, "--completions",
                       f"by the attribution run {r.path}")
    if tr_data is not None:
        check_held_out(set(tr_data.groups), ev_data.groups, "--completions", "in --train")
    lm = load_model(model, device=device, dtype=dtype)
    the_sae.check_fits(lm.d_model, layer, lm.name)
    the_sae.to(lm.device)
    ev = Split(ev_data, read_cached(lm, the_sae, layer, ev_data.completions,
                                    out / "features.safetensors", cfg.batch_size))
    tr = None if tr_data is None else Split(tr_data, read_cached(
        lm, the_sae, layer, tr_data.completions, out / "train_features.safetensors",
        cfg.batch_size, "reading --train"))
    results = evaluate(ev, latent_sets(cfg, the_sae.d_sae, r, latents), cfg, tr)
    results = {"schema_version": SCHEMA_VERSION, "stage": "monitor-evaluate",
               "model": lm.name, "d_model": lm.d_model, "layer": layer,
               "hook": the_sae.info.hook,
               "sae": {"path": the_sae.info.source_path, "digest": sae_digest(the_sae),
                       "d_sae": the_sae.d_sae},
               "run": str(r.path) if r else None, "config": _config(cfg), **results}
    write_evaluation(out, results)
    return results


def _config(cfg: EvalConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(cfg), "top_k": list(cfg.top_k)}
