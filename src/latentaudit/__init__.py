"""latentaudit: find the SAE latents that cause a language model's bad completions.

The public API is re-exported lazily so ``import latentaudit`` (and ``latentaudit --help``)
does not import torch. No exported name is also the name of a subpackage or module: importing a
submodule sets the package attribute of its name, which would hide the export (the attribution
stage is therefore the subpackage ``attribution`` and ``latentaudit.attribute`` its function).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SAE": "latentaudit.saes.sae",
    "SAEInfo": "latentaudit.saes.sae",
    "load_sae": "latentaudit.saes",
    "load_model": "latentaudit.models.load",
    "LoadedModel": "latentaudit.models.load",
    "load_behaviour": "latentaudit.data.behaviour",
    "attribute": "latentaudit.attribution",
    "AttributionConfig": "latentaudit.attribution",
    "AttributionResult": "latentaudit.attribution",
    "LayerAttribution": "latentaudit.attribution",
    "explain_latents": "latentaudit.explain",
    "ExplainConfig": "latentaudit.explain",
    "ExplainResult": "latentaudit.explain",
    "across_runs": "latentaudit.explain",
    "trace_circuit": "latentaudit.circuit",
    "CircuitConfig": "latentaudit.circuit",
    "CircuitResult": "latentaudit.circuit",
    "run_pipeline": "latentaudit.pipeline",
    "run_demo": "latentaudit.pipeline",
    "steer_latents": "latentaudit.steer",
    "SteerConfig": "latentaudit.steer",
    "plan_steering": "latentaudit.steer",
    "run_steering": "latentaudit.steer",
    "write_report": "latentaudit.report",
    "EngineConfig": "latentaudit.executor",
    "LatentAuditError": "latentaudit.errors",
    "fetch_corpus": "latentaudit.data.corpus",
    "load_corpus": "latentaudit.data.corpus",
    "iter_documents": "latentaudit.data.corpus",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'latentaudit' has no attribute '{name}'") from None
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
