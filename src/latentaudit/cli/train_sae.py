"""``latentaudit train-sae``: harvest a layer's activations and train a TopK SAE on them.

OUT receives activations/ (harvested shards and their manifest), checkpoint/ (resumable training
state) and, at the end, the SAE itself (cfg.json and sae.safetensors, with the mean activation
and the training record). Training reads the text's train split; the final evaluation (FVU, L0,
dead latents, CE-loss increase) reads --eval-sequences sequences of its held-out split (or, when
a small corpus has none, its first sequences, which are then kept out of training).
"""

from __future__ import annotations

import argparse
import shlex

from latentaudit.cli._options import Config, Flag
from latentaudit.options import flag

NAME = "train-sae"
HELP = "Train a TopK sparse autoencoder on a model's residual stream at one layer."
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP


TRAIN = Config("latentaudit.saes.train", "TrainConfig")
"""The TrainConfig flags (each written once, as its field)."""

HARVEST = Config("latentaudit.saes.harvest", "HarvestConfig",
                 batch_size=Flag(name="harvest-batch"))
"""The HarvestConfig flags; its seed is --seed and its tokens --harvest-tokens (or --tokens)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Model: embedded short name, folder or hub id.")
    HARVEST.add(p, "layer")
    TRAIN.add(p, "d_sae", "k", "tokens")
    p.add_argument("--out", required=True, help="Output folder (SAE, activations, checkpoint).")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="PATH",
                   help="Text: .txt files (one document each), .jsonl files (one {\"text\": ...} "
                        "per line) or folders of them; default: the cached reference corpus.")
    p.add_argument("--harvest-tokens", type=int, default=None,
                   help="Tokens to harvest (default: --tokens); fewer means several epochs.")
    TRAIN.add(p, "batch_size", "lr")
    HARVEST.add(p, "context_len", "packing", "skip_first", "batch_size", "shard_tokens",
                "window_tokens", "store_dtype")
    TRAIN.add(p, "auxk_coef", "k_aux", "dead_tokens", "b_dec_init", "checkpoint_every")
    p.add_argument("--eval-sequences", type=int, default=32,
                   help="Sequences of the held-out split used for the final evaluation.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto",
                   help="Model dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16.")
    TRAIN.add(p, "seed")
    p.add_argument("--resume", action="store_true",
                   help="Continue the harvest and training already in --out.")


def _command_line(args: argparse.Namespace) -> str:
    parts = ["latentaudit", NAME]
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("command", "verbose") or value is None or value is False:
            continue
        name = flag(key)
        if value is True:
            parts.append(name)
        elif isinstance(value, list):
            parts += [name, *map(str, value)]
        else:
            parts += [name, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from latentaudit.saes.pipeline import train_sae

    # Configs first: their validation fails fast, before the model loads.
    hcfg = HARVEST.build(args, tokens=args.harvest_tokens or args.tokens,
                         window_tokens=max(args.window_tokens, args.shard_tokens))
    tcfg = TRAIN.build(args)
    r = train_sae(args.model, args.out, hcfg, tcfg, corpus=args.corpus,
                  eval_sequences=args.eval_sequences, device=args.device, dtype=args.dtype,
                  resume=args.resume, command=_command_line(args))
    ev = r.evaluation
    print(f"Saved the SAE to {r.out}: FVU {ev.fvu:.3f}, L0 {ev.l0:.1f}, "
          f"dead {r.dead_fraction_train:.1%}, CE +{ev.ce.increase:.4f} nats "
          f"({ev.ce.increase_pct:.1f}% of mean ablation) on {ev.tokens} held-out tokens.")
    return 0
