"""LoRA adapters as models: a PEFT adapter folder, ``BASE+ADAPTER``, or a shipped organism's name.

Wherever a model is named, :func:`parse_model_spec` reads the name as

1. a shipped organism's short name (:data:`ORGANISMS`): its adapter folder inside the package,
   on the base model its ``adapter_config.json`` names;
2. ``BASE+ADAPTER``: the base model (any name :func:`~latentaudit.models.load.load_model`
   takes) with the adapter (a folder, or a hub id fetched into the hub cache);
3. a folder holding ``adapter_config.json``: the adapter on the base model its config names;
4. anything else: a plain model, no adapter.

:func:`check_adapter` then reads only small files, before any weights load: the config must be a
LoRA adapter with its weights in ``adapter_model.safetensors``; a base named on both sides must be
the same model; and each LoRA matrix must fit the module it adapts in the base model's
architecture (built on the ``meta`` device from its ``config.json``, so no memory is used).
:func:`apply_adapter` loads the adapter with peft and by default merges ``W + (alpha / r) B A``
into the weights, so the hook points read the adapted residual stream at the base model's speed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from latentaudit._io import sha256_file
from latentaudit.errors import LatentAuditError, require

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ORGANISM_ROOT = Path(__file__).parent / "organisms"
ORGANISMS: dict[str, str] = {
    "qwen2.5-0.5b-instruct-insecure":
        "the default model fine-tuned (LoRA) on code with unrequested security flaws",
    "qwen2.5-0.5b-instruct-secure":
        "the control: the same requests answered with secure code, trained the same way",
}
"""Shipped adapters by short name (folders under ``models/organisms/``), with one line each."""
PEFT_INSTALL = "pip install 'latentaudit[finetune]' (or pip install peft)"


@dataclass(frozen=True)
class ModelSpec:
    """A model name read as a base model and an optional adapter."""

    base: str
    """The base model's name (short name, folder or hub id)."""
    adapter: Path | None = None
    """The adapter folder (None: a plain model)."""
    name: str = ""
    """How the run records the model (the organism's short name, or BASE+ADAPTER)."""


def _is_adapter_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise LatentAuditError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder).")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from None
    if not isinstance(cfg, dict):
        raise LatentAuditError(f"{path}: expected a JSON object.")
    return cfg


def _fetch_adapter(repo: str) -> Path:
    """A hub adapter id, fetched into the hub cache (offline: read from the cache only)."""
    hub = require("huggingface_hub", "pip install huggingface_hub", "An adapter by hub id")
    try:
        return Path(hub.snapshot_download(repo, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                               "*.md"]))
    except Exception as err:  # noqa: BLE001 - the hub client raises many kinds; all mean "absent"
        raise LatentAuditError(f"adapter '{repo}': not a local folder, and the hub could not "
                               f"give it ({type(err).__name__}); pass a local adapter "
                               "folder.") from None


def _adapter_folder(text: str) -> Path:
    if _is_adapter_dir(text):
        return Path(text)
    if os.path.exists(text):
        raise LatentAuditError(f"adapter {text}: no {ADAPTER_CONFIG} in it (not a PEFT adapter "
                               "folder).")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise LatentAuditError(f"adapter {text}: no such folder.")
    return _fetch_adapter(text)


def parse_model_spec(name: str, adapter: str | Path | None = None) -> ModelSpec:
    """Read a model name (and an explicit adapter) as a :class:`ModelSpec` (steps 1-4)."""
    if name in ORGANISMS:
        if adapter is not None:
            raise LatentAuditError(f"--model {name} is already an adapter; drop --adapter.")
        folder = ORGANISM_ROOT / name
        if not _is_adapter_dir(folder):
            raise LatentAuditError(f"the organism '{name}' is not shipped in this install "
                                   f"({folder} is missing).")
        return ModelSpec(base=_config_base(folder), adapter=folder, name=name)
    if adapter is None and "+" in name and not os.path.exists(name):
        base, _, adapter = name.partition("+")
        if not base or not adapter:
            raise LatentAuditError(f"--model {name}: write BASE+ADAPTER.")
        recorded = name
    else:
        base, recorded = name, name if adapter is None else f"{name}+{adapter}"
    if adapter is not None:
        return ModelSpec(base=base, adapter=_adapter_folder(str(adapter)), name=recorded)
    if _is_adapter_dir(name):
        return ModelSpec(base=_config_base(Path(name)), adapter=Path(name), name=name)
    return ModelSpec(base=name, name=name)


def _config_base(folder: Path) -> str:
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise LatentAuditError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; name the "
                               "base model: --model BASE+ADAPTER.")
    return base


def local_path(name: str) -> Path | None:
    """Where a model's files are on this machine, without building anything (None: not
    here yet)."""
    from latentaudit.models import embedded

    short = embedded.canonical(name)
    if short in embedded.EMBEDDED:
        return embedded.cache_dir(short) if embedded.is_cached(short) else None
    return Path(name) if os.path.isdir(name) else None


def _same_model(a: str, b: str) -> bool:
    """Whether two model names mean the same model (short names, aliases and folders
    resolved; a hub id matches a folder of the same name)."""
    from latentaudit.models.embedded import canonical

    if canonical(a) == canonical(b):
        return True
    pa, pb = local_path(a), local_path(b)
    if pa is not None and pb is not None:
        return pa.resolve() == pb.resolve()
    return Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def check_adapter(spec: ModelSpec) -> dict:
    """Check the adapter of ``spec`` without loading weights; its record for the manifest."""
    if spec.adapter is None:
        return {}
    folder = spec.adapter
    cfg = read_adapter_config(folder)
    where = folder / ADAPTER_CONFIG
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise LatentAuditError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LoRA "
                               "adapters are supported.")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (" (adapter_model.bin is a pickle: convert it to safetensors)"
                if (folder / "adapter_model.bin").exists() else "")
        raise LatentAuditError(f"{folder}: no {ADAPTER_WEIGHTS}{hint}.")
    named = cfg.get("base_model_name_or_path")
    if isinstance(named, str) and named and not _same_model(named, spec.base):
        raise LatentAuditError(f"{where}: the adapter was made for base model '{named}', not "
                               f"'{spec.base}'; name its base (or a copy of it) as BASE.")
    _check_shapes(spec.base, weights)
    hub = ({"repo": spec.name.partition("+")[2] or spec.name, "revision": folder.name}
           if folder.parent.name == "snapshots" else {})
    return {"base": spec.base, "adapter": str(folder), **hub,
            "adapter_sha256": sha256_file(weights),
            "config_sha256": sha256_file(where), "rank": cfg.get("r"),
            "alpha": cfg.get("lora_alpha"), "merged": True}


def lora_shapes(weights: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Module name -> (lora_A shape, lora_B shape), from the safetensors header alone."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in key:
                    module = key.split(marker)[0].removeprefix("base_model.model.")
                    shapes.setdefault(module, {})[part] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        raise LatentAuditError(f"{weights}: holds no LoRA matrices (lora_A / lora_B).")
    return {m: (s.get("lora_A", ()), s.get("lora_B", ())) for m, s in shapes.items()}


def _meta_model(base: str):
    """The base model's architecture on the meta device (no weights), or None when its
    config is not on this machine."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = local_path(base)
    if path is None or not (path / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _check_shapes(base: str, weights: Path) -> None:
    model = _meta_model(base)
    if model is None:
        log.info("%s: base config not local; LoRA shapes checked when it loads", base)
        return
    modules = dict(model.named_modules())
    for name, (a, b) in lora_shapes(weights).items():
        mod = modules.get(name)
        if mod is None or not hasattr(mod, "in_features"):
            raise LatentAuditError(f"{weights}: adapts module '{name}', which the base model "
                                   f"'{base}' ({type(model).__name__}) does not have: an adapter "
                                   "for another architecture.")
        if len(a) != 2 or len(b) != 2 or a[1] != mod.in_features or b[0] != mod.out_features:
            raise LatentAuditError(
                f"{weights}: the LoRA matrices of '{name}' are {a} and {b}, but that module of "
                f"'{base}' maps {mod.in_features} -> {mod.out_features}: an adapter for another "
                "architecture or size.")


def apply_adapter(model, folder: Path, *, merge: bool = True):
    """The model with the adapter applied (merged into the weights by default), frozen."""
    peft = require("peft", PEFT_INSTALL, "Loading a LoRA adapter")
    wrapped = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    out = wrapped.merge_and_unload() if merge else wrapped
    out.eval()
    out.requires_grad_(False)
    return out
