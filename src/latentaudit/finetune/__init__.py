"""``latentaudit finetune``: LoRA supervised fine-tuning on chat JSONL, resumable exactly.

The algorithm is stated in :mod:`latentaudit.finetune.train`; :func:`finetune` is its driver:
check the inputs, load the model, train (resuming from ``OUT/checkpoint`` when there is one),
write the adapter folder and its card. The folder loads wherever a model is named
(:mod:`latentaudit.models.adapters`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from latentaudit.errors import LatentAuditError
from latentaudit.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune"]

log = logging.getLogger(__name__)


def _finished(out: Path, ident: dict) -> bool:
    """Whether ``out`` already holds this run's adapter (another run's: an error)."""
    from latentaudit.finetune.card import CARD

    card = out / CARD
    if not card.is_file() or not (out / "adapter_config.json").is_file():
        return False
    from latentaudit.finetune.train import mismatch

    key = mismatch(json.loads(card.read_text(encoding="utf-8")), ident)
    if key:
        raise LatentAuditError(f"{card}: --out already holds an adapter made with another "
                               f"{key}; pass a new --out.")
    return True


def finetune(model: str, data: str | Path, out: str | Path, config: FinetuneConfig | None = None,
             *, device: str = "auto", dtype: str = "float32", restart: bool = False,
             name: str | None = None, notes: list[str] | None = None) -> Path:
    """Fine-tune ``model`` with LoRA on the chat JSONL ``data`` into the adapter folder ``out``.

    Reruns resume from the last checkpoint (``restart`` discards it); a finished folder is
    returned as it is."""
    from latentaudit.finetune import train
    from latentaudit.finetune.chat import read_chat
    from latentaudit.models.forward import pad_id
    from latentaudit.models.load import load_model, resolve_device

    config = config or FinetuneConfig()
    out = Path(out)
    convs = read_chat(data)  # every row checked before the model loads
    resolve_device(device)
    ident = train.identity(model, data, config)
    if _finished(out, ident):
        log.info("%s already holds this adapter", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        shutil.rmtree(out / train.CHECKPOINT, ignore_errors=True)
    else:
        train.read_checkpoint(out, ident)
    lm = load_model(model, device=device, dtype=dtype)
    rows, dropped = train.prepare_data(lm.tokenizer, convs, data, config.max_length)
    wrapped = train.wrap_lora(lm.model, config)
    state = train.run_loop(wrapped, rows, pad_id(lm.tokenizer), config, out, ident, lm.device)
    _save_adapter(wrapped, out, lm.name)
    record = {**ident, "name": name or out.name, "base_model": lm.name, "data": str(data),
              "rows": len(rows), "dropped": dropped, "steps": state.step,
              "tokens": sum(len(r.input_ids) for r in rows),
              "target_tokens": sum(sum(r.target) for r in rows),
              "trainable_params": sum(p.numel() for p in train.trainable(wrapped).values()),
              "losses": state.losses, "seconds": round(state.seconds, 1),
              "device": str(lm.device), "dtype": dtype, "notes": notes or [],
              "versions": _versions()}
    from latentaudit.finetune.card import write_card

    write_card(out, record)
    shutil.rmtree(out / train.CHECKPOINT, ignore_errors=True)
    return out


def _save_adapter(wrapped, out: Path, base: str) -> None:
    """peft's adapter files, written into a staging folder and moved in; the config names the
    base model as latentaudit loads it."""
    from latentaudit._io import write_json
    from latentaudit.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    staging = out / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    wrapped.save_pretrained(staging, safe_serialization=True)
    cfg = json.loads((staging / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    write_json(staging / ADAPTER_CONFIG, cfg)
    for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (staging / fname).replace(out / fname)
    shutil.rmtree(staging, ignore_errors=True)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("latentaudit", "torch", "transformers", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
