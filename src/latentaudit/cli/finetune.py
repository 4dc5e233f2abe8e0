"""``latentaudit finetune``: LoRA fine-tuning of a causal LM on chat JSONL."""

from __future__ import annotations

import argparse

from latentaudit.cli import DEVICE_HELP
from latentaudit.cli._options import Config

NAME = "finetune"
HELP = "Fine-tune a model with LoRA on chat JSONL (loss on the assistant's tokens); resumable."
DESCRIPTION = (
    "LoRA supervised fine-tuning of any causal LM on chat JSONL rows {\"messages\": [...]}, the "
    "loss taken on the assistant's tokens only. A checkpoint is written every N steps: rerun the "
    "same command after a stop and it resumes, ending with the weights of an uninterrupted run. "
    "OUT becomes a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) with its "
    "card (finetune.json, README.md, loss.png); name it wherever a model is named, or as "
    "BASE+OUT.")
CONFIG = Config("latentaudit.finetune.config", "FinetuneConfig")
"""The FinetuneConfig flags, one per field."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Base model: an embedded short name, a local folder or a hub id.")
    p.add_argument("--data", required=True, help="Chat JSONL: one {\"messages\": [...]} a line.")
    p.add_argument("--out", required=True, help="Adapter folder to write (and resume in).")
    CONFIG.add(p)
    p.add_argument("--restart", action="store_true",
                   help="Discard a checkpoint in OUT and start again.")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16.")


def run(args) -> int:
    from latentaudit.finetune import finetune

    out = finetune(args.model, args.data, args.out, CONFIG.build(args),
                   device=args.device, dtype=args.dtype, restart=args.restart)
    print(f"adapter written to {out} (card: {out / 'README.md'})")
    return 0
