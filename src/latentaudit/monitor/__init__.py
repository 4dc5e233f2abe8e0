"""The monitor stage: would the latents found have flagged the bad completions before a judge?

1. ``evaluate``: score held-out graded completions (prompts not used for attribution) by each
   latent's mean (and max) activation over the completion's tokens, and by a logistic
   combination of the top K; report ROC AUC with a prompt-level bootstrap interval and precision
   at a chosen recall, next to the baselines: top K by Δ-activation, random latents, and a
   linear probe on the raw residual (the ceiling) (:mod:`.evaluate`, :mod:`.report`).
2. ``fit``: fit a monitor (latents, weights, threshold) on labelled completions and write it as
   a safetensors file whose JSON header records the SAE, layer and model it reads
   (:mod:`.fit`, :mod:`.file`).
3. ``score``: apply a monitor to new completions, streaming JSONL in and out, resumable, refusing
   a monitor whose SAE, layer or model differs (:mod:`.score`).

The reading of completions is shared (:mod:`.read`); the metrics are pure tensor functions
(:mod:`.metrics`); the logistic fit is :mod:`latentaudit.logistic`, shared with the probe judge.
Reference: the monitoring idea of reading misalignment off SAE latents (OpenAI, 2025), measured
here against the attribution's own baselines.

Shapes use the package's vocabulary: ``batch`` (one row per completion; ``train`` / ``test``
where two sets meet), ``pos``, ``d_model``, ``d_sae``, ``k`` (the latents read) and ``d_in`` (a
monitor's inputs: k × the number of reductions); local comments abbreviate them (B, T, D, S, k),
N being the completion tokens of a batch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalConfig": "latentaudit.monitor.evaluate",
    "run_evaluation": "latentaudit.monitor.evaluate",
    "run_fit": "latentaudit.monitor.fit",
    "run_score": "latentaudit.monitor.score",
    "Monitor": "latentaudit.monitor.file",
    "load_monitor": "latentaudit.monitor.file",
    "roc_auc": "latentaudit.monitor.metrics",
    "precision_at_recall": "latentaudit.monitor.metrics",
    "bootstrap_ci": "latentaudit.monitor.metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'latentaudit.monitor' has no attribute '{name}'") from None
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
