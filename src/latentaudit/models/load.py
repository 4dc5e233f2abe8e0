"""Load any Hugging Face causal LM (local path, hub id, or embedded short name) for latentaudit.

Parameters are frozen (``requires_grad=False``): attribution differentiates with respect to
activations only. Hub ids are used only when a network is available; embedded short names
(:mod:`latentaudit.models.embedded`) resolve to a local dequantized cache.

``--device auto-map`` spreads a model too large for one GPU over every visible GPU (then host
memory), layer by layer (Hugging Face ``device_map="auto"``, which needs ``accelerate``). Inputs
go to the device of the input embedding (:attr:`LoadedModel.device`); whatever works at a hook
point (an SAE, a steering vector, the attribution sums) lives on the device of the hooked layer
(:func:`~latentaudit.models.hooks.layer_device`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer."""

    model: nn.Module
    """The Hugging Face causal LM, in eval mode, parameters frozen."""
    tokenizer: object
    """Its tokenizer (padding side set to left)."""
    name: str
    """What the user asked for (short name, path or hub id)."""
    path: str
    """Where the weights were read from."""
    adapter: dict | None = None
    """The LoRA adapter merged into the weights (base, folder, digests), if any."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding."""
        emb = self.model.get_input_embeddings() if hasattr(
            self.model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        return weight.device if weight is not None else next(self.model.parameters()).device

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map 'fp32' / 'bf16' / ... to a torch dtype, with a clear error for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise OptionError(
            "dtype", f"{{}} '{dtype}' is not one of {', '.join(sorted(DTYPES))}.") from None


DEVICES = "auto, cpu, cuda, cuda:N, mps or auto-map"
AUTO_MAP = "auto-map"
"""The --device value that spreads the model over every visible GPU (device_map="auto")."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when available; otherwise the named device, which must be
    cpu, cuda, cuda:N or mps and present on this machine (else one clear error). 'auto-map'
    resolves to where its inputs go: the first GPU, or the CPU when there is none."""
    if device is None or device in ("auto", AUTO_MAP):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError("device", f"{{}} {device!r} is not a device: use {DEVICES}.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", f"{{}} {device} was requested but CUDA is not available "
                                        "on this machine: use {} cpu (or auto).")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError("device", f"{{}} {device}: this machine has {count} CUDA "
                                        f"device(s), numbered 0 to {count - 1}.")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError("device", f"{{}} {device} was requested but MPS is not available "
                                        "on this machine: use {} cpu (or auto).")
    elif dev.type != "cpu":
        raise OptionError("device", f"{{}} {device!r} is not supported: use {DEVICES}.")
    return dev


def resolve_model_path(name: str) -> str:
    """An embedded short name becomes its local cache folder; paths and hub ids pass through."""
    from latentaudit.models import embedded

    if embedded.canonical(name) in embedded.EMBEDDED:
        return str(embedded.embedded_path(embedded.canonical(name)))
    if os.path.exists(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not "org/name"
        raise LatentAuditError(f"--model {name}: no such file or folder.")
    return name  # a hub id


def load_model(name: str, device: str | None = "auto", dtype: str | torch.dtype = "float32",
               attn_implementation: str | None = None, adapter: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen, in eval mode, on ``device`` in ``dtype``
    (``device="auto-map"``: spread over every visible GPU, see the module docstring).

    ``name`` may be a LoRA adapter (a folder, ``BASE+ADAPTER`` or a shipped organism's name) or
    ``adapter`` name one: the adapter is checked before any weights load and merged into the
    base model's weights (:mod:`latentaudit.models.adapters`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentaudit.models.adapters import apply_adapter, check_adapter, parse_model_spec

    spec = parse_model_spec(name, adapter)
    record = check_adapter(spec)
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    spread = device == AUTO_MAP
    base = spec.base
    path = resolve_model_path(base)
    offline = not Path(path).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {"dtype": torch_dtype}
        if spread:
            _need_accelerate()
            kwargs["device_map"] = "auto"
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        hint = (" It is not a local folder, and the hub could not be reached or has no such "
                "model; pass a local path or an embedded name (`latentaudit models list`)."
                if offline else "")
        raise LatentAuditError(f"Could not load model '{base}': {err}.{hint}") from err
    from latentaudit.models.embedded import canonical

    if spec.adapter is not None:
        model = apply_adapter(model, spec.adapter)
    loaded = prepare(model, tokenizer, name=canonical(spec.name), path=path,
                     device=None if spread else dev)
    loaded.adapter = record or None
    return loaded


def _need_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise LatentAuditError("--device auto-map needs the accelerate package: pip install "
                               "accelerate (or latentaudit[models]).") from None


def prepare(model: nn.Module, tokenizer, *, name: str, path: str = "",
            device: torch.device | str | None = None) -> LoadedModel:
    """Freeze and place an already-built model; set the tokenizer up for left padding."""
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path or name)
