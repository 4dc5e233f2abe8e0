"""Readers shared by the SAE format loaders: every problem is one error naming the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentaudit.errors import LatentAuditError, ShapeMismatchError
from latentaudit.saes.sae import CONFIG_FILE, _check_shape, load_config

_TL_HOOK = re.compile(r"blocks\.(\d+)\.(?:hook_)?(.+)$")
_HF_HOOK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.(.+))?$")


def read_cfg(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise LatentAuditError(f"{file} is missing: an SAE folder needs its config file.")
    try:
        cfg = load_config(folder)
    except UnicodeDecodeError as err:
        raise LatentAuditError(f"{file} is not UTF-8 text ({err.reason}): re-save it.") from err
    if not isinstance(cfg, dict):
        raise LatentAuditError(f"{file}: expected a JSON object, got {type(cfg).__name__}.")
    return cfg


def read_tensors(file: Path) -> dict[str, Any]:
    """All tensors of a .safetensors, .npz (no pickles) or .pt (weights_only) file."""
    import pickle

    if not file.is_file():
        raise LatentAuditError(f"{file} is missing: the SAE's weights file is needed.")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        if file.suffix == ".npz":
            import numpy as np

            with np.load(file, allow_pickle=False) as data:
                return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LatentAuditError(
            f"{file} holds Python objects that torch.load(weights_only=True) refuses: save the "
            "autoencoder's state_dict() instead of the whole object.") from err
    except Exception as err:
        raise LatentAuditError(f"{file} is not a readable {file.suffix} weights file ({err}): "
                               "re-download or re-save it.") from err
    if not isinstance(obj, dict):
        raise LatentAuditError(f"{file} holds a {type(obj).__name__}, not a state dict: save the "
                               "autoencoder's state_dict().")
    return obj


def take(file: Path, tensors: dict[str, Any], shapes: dict[str, tuple[int | None, ...]],
          source: str = "") -> list[Tensor]:
    """The named tensors, each present, finite and of its shape, or one error naming the file
    and the tensor (and ``source``, the config values the expected shape came from)."""
    out = []
    for name, shape in shapes.items():
        if name not in tensors:
            raise LatentAuditError(
                f"{file} has no tensor '{name}' (it has: {', '.join(sorted(tensors))}): the "
                "file is incomplete or in another format.")
        t = tensors[name]
        try:
            _check_shape(str(file), name, t, shape)
        except ShapeMismatchError as err:
            raise ShapeMismatchError(str(err).rstrip(".") + (f" from {source}." if source
                                                              else ".")) from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LatentAuditError(f"{file}: tensor '{name}' contains NaN or infinite values; "
                                   "the file is corrupt or its training diverged.")
        out.append(t)
    return out


def cfg_int(file: Path, cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LatentAuditError(f"{file}: field '{key}' must be a positive integer, "
                               f"got {value!r}.")
    return value


_HF_POINTS = {"mlp": "mlp_out", "feed_forward": "mlp_out", "self_attn": "attn_out",
              "attn": "attn_out", "attention": "attn_out"}
_TL_POINTS = {"ln2.hook_normalized": "mlp_in"}
"""TransformerLens names of a point latentaudit calls otherwise (the MLP's normalised input)."""


def parse_hook(name: str) -> tuple[int | None, str | None]:
    """(layer, hook) of a TransformerLens or Hugging Face hook name; resid_pre of L > 0 is
    L-1's resid_post; a Hugging Face module name is its output (``layers.3.mlp``: mlp_out)."""
    if m := _TL_HOOK.search(name):
        layer, hook = int(m[1]), m[2]
        if hook == "resid_pre":
            return (layer - 1, "resid_post") if layer > 0 else (0, "resid_pre")
        return layer, _TL_POINTS.get(hook, hook)
    if m := _HF_HOOK.search(name):
        return int(m[1]), _HF_POINTS.get(m[2], m[2]) if m[2] else "resid_post"
    return None, None


def extra(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
