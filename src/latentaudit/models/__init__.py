"""Models: load a causal LM (path, hub id or embedded name) and reach its residual stream.

Names are re-exported lazily so that importing :mod:`latentaudit.models.embedded` (used by the
fast ``latentaudit models`` command) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "capture_resid": "hooks", "layer_device": "hooks", "layer_list": "hooks",
    "layer_module": "hooks",
    "num_layers": "hooks", "resid_hooks": "hooks", "run_until": "hooks",
    "LoadedModel": "load", "load_model": "load", "parse_dtype": "load", "prepare": "load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'latentaudit.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
