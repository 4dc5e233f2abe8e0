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

from latentaudit.options import flag

NAME = "train-sae"
HELP = "Train a TopK sparse autoencoder on a model's residual stream at one layer."
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP


def _doc(field: str, cls: str = "TrainConfig", source: str = "saes/train.py") -> str:
    from latentaudit.cli import field_docs

    return field_docs(source, cls).get(field, "")


def _harvest_doc(field: str) -> str:
    return _doc(field, "HarvestConfig", "saes/harvest.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Model: embedded short name, folder or hub id.")
    p.add_argument("--layer", type=int, required=True, help=_harvest_doc("layer"))
    p.add_argument("--d-sae", type=int, required=True, help=_doc("d_sae"))
    p.add_argument("--k", type=int, required=True, help=_doc("k"))
    p.add_argument("--tokens", type=int, required=True, help=_doc("tokens"))
    p.add_argument("--out", required=True, help="Output folder (SAE, activations, checkpoint).")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="PATH",
                   help="Text: .txt files (one document each), .jsonl files (one {\"text\": ...} "
                        "per line) or folders of them; default: the cached reference corpus.")
    p.add_argument("--harvest-tokens", type=int, default=None,
                   help="Tokens to harvest (default: --tokens); fewer means several epochs.")
    p.add_argument("--batch-size", type=int, default=4096, help=_doc("batch_size"))
    p.add_argument("--lr", type=float, default=None, help=_doc("lr"))
    p.add_argument("--context-len", type=int, default=128, help=_harvest_doc("context_len"))
    p.add_argument("--packing", choices=("pack", "truncate"), default="pack",
                   help=_harvest_doc("packing"))
    p.add_argument("--skip-first", type=int, default=1, help=_harvest_doc("skip_first"))
    p.add_argument("--harvest-batch", type=int, default=32, help=_harvest_doc("batch_size"))
    p.add_argument("--shard-tokens", type=int, default=65536, help=_harvest_doc("shard_tokens"))
    p.add_argument("--window-tokens", type=int, default=262144,
                   help=_harvest_doc("window_tokens"))
    p.add_argument("--store-dtype", default="bfloat16", help=_harvest_doc("store_dtype"))
    p.add_argument("--auxk-coef", type=float, default=1 / 32, help=_doc("auxk_coef"))
    p.add_argument("--k-aux", type=int, default=None, help=_doc("k_aux"))
    p.add_argument("--dead-tokens", type=int, default=None, help=_doc("dead_tokens"))
    p.add_argument("--b-dec-init", choices=("mean", "geometric_median", "zero"), default="mean",
                   help=_doc("b_dec_init"))
    p.add_argument("--checkpoint-every", type=int, default=1000, help=_doc("checkpoint_every"))
    p.add_argument("--eval-sequences", type=int, default=32,
                   help="Sequences of the held-out split used for the final evaluation.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto",
                   help="Model dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16.")
    p.add_argument("--seed", type=int, default=0, help=_doc("seed"))
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
    from latentaudit.saes.harvest import HarvestConfig
    from latentaudit.saes.pipeline import train_sae
    from latentaudit.saes.train import TrainConfig

    # Configs first: their validation fails fast, before the model loads.
    hcfg = HarvestConfig(layer=args.layer, tokens=args.harvest_tokens or args.tokens,
                         context_len=args.context_len, packing=args.packing,
                         skip_first=args.skip_first, batch_size=args.harvest_batch,
                         shard_tokens=args.shard_tokens,
                         window_tokens=max(args.window_tokens, args.shard_tokens),
                         store_dtype=args.store_dtype, seed=args.seed)
    tcfg = TrainConfig(d_sae=args.d_sae, k=args.k, tokens=args.tokens, batch_size=args.batch_size,
                       lr=args.lr, auxk_coef=args.auxk_coef, k_aux=args.k_aux,
                       dead_tokens=args.dead_tokens, b_dec_init=args.b_dec_init,
                       checkpoint_every=args.checkpoint_every, seed=args.seed)
    r = train_sae(args.model, args.out, hcfg, tcfg, corpus=args.corpus,
                  eval_sequences=args.eval_sequences, device=args.device, dtype=args.dtype,
                  resume=args.resume, command=_command_line(args))
    ev = r.evaluation
    print(f"Saved the SAE to {r.out}: FVU {ev.fvu:.3f}, L0 {ev.l0:.1f}, "
          f"dead {r.dead_fraction_train:.1%}, CE +{ev.ce.increase:.4f} nats "
          f"({ev.ce.increase_pct:.1f}% of mean ablation) on {ev.tokens} held-out tokens.")
    return 0
