"""``latentaudit train-sae``: harvest a layer's activations and train a TopK SAE on them.

OUT receives activations/ (harvested shards and their manifest), checkpoint/ (resumable training
state) and, at the end, the SAE itself (cfg.json and sae.safetensors, with the mean activation
and the training record). Training reads the text's train split; the final evaluation (FVU, L0,
dead latents, CE-loss increase) reads --eval-sequences sequences of its held-out split (or, when
a small corpus has none, its first sequences, which are then kept out of training).
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
from functools import lru_cache
from pathlib import Path

NAME = "train-sae"
HELP = "Train a TopK sparse autoencoder on a model's residual stream at one layer."
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP


@lru_cache(maxsize=2)
def _field_docs(module: str, cls: str) -> dict[str, str]:
    """Field docstrings of a dataclass, read from its source without importing it (fast)."""
    # find_spec would import the parent package (and torch); the file sits beside cli/.
    source = Path(__file__).parents[1].joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and \
                isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _doc(field: str, cls: str = "TrainConfig", module: str = "latentaudit.saes.train") -> str:
    return _field_docs(module, cls).get(field, "")


def _harvest_doc(field: str) -> str:
    return _doc(field, "HarvestConfig", "latentaudit.saes.harvest")


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
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from latentaudit.errors import LatentAuditError

    out = Path(args.out)
    started = [p for p in ("cfg.json", "activations/manifest.json", "checkpoint/checkpoint.json")
               if (out / p).exists()]
    if started and not args.resume:
        raise LatentAuditError(
            f"--out {out} already holds a run ({started[0]}): pass --resume to continue it, "
            "or choose another --out.")
    if args.eval_sequences < 1:
        raise LatentAuditError("--eval-sequences must be at least 1.")
    return _train(args, out)


def _train(args: argparse.Namespace, out: Path) -> int:
    import itertools

    from latentaudit.errors import LatentAuditError
    from latentaudit.models.load import load_model, resolve_device
    from latentaudit.saes.harvest import HarvestConfig, harvest, token_sequences
    from latentaudit.saes.metrics import evaluate_sae
    from latentaudit.saes.sae import SAEInfo
    from latentaudit.saes.train import CHECKPOINT, TrainConfig, Trainer

    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device.type == "cuda" else "float32")
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
    loaded = load_model(args.model, device=str(device), dtype=dtype)
    source = _describe(args.corpus)

    def sequences(split: str):
        return token_sequences(_texts(args.corpus, split), loaded.tokenizer, args.context_len,
                               args.packing)

    seqs = sequences("train")
    eval_seqs = list(itertools.islice(sequences("held_out"), args.eval_sequences))
    eval_text = "held-out split"
    if not eval_seqs:  # a small corpus may have no held-out document: hold out its start
        eval_seqs = list(itertools.islice(seqs, args.eval_sequences))
        eval_text = f"first {len(eval_seqs)} sequences of the train split, not trained on"
        source += f", minus its first {args.eval_sequences} sequences"
    if not eval_seqs:
        raise LatentAuditError(f"The {source} holds no text of at least two tokens.")
    store = harvest(loaded, seqs, out / "activations", hcfg, source=source)
    ckpt = out / "checkpoint"
    if args.resume and (ckpt / CHECKPOINT).exists():
        trainer = Trainer.resume(ckpt, device, tcfg)
    else:
        trainer = Trainer.start(tcfg, store, device)
    trainer.fit(store, checkpoint_dir=ckpt)
    mean = store.mean()
    training = {"model": args.model, "layer": args.layer, "hook": "resid_post",
                "data": source, "harvest": {k: store.manifest[k] for k in (
                    "tokens", "context_len", "packing", "skip_first", "store_dtype")},
                "tokens": trainer.step * tcfg.batch_size, "steps": trainer.step,
                "input_scale": trainer.scale, "dead_fraction_train": trainer.dead_fraction(),
                "config": json.loads(json.dumps(vars(tcfg))), "command": _command_line(args)}
    info = SAEInfo(activation="topk", k=args.k, subtract_b_dec=True, model=args.model,
                   layer=args.layer, hook="resid_post", extra={"training": training})
    sae = trainer.export(info, mean)
    pad = getattr(loaded.tokenizer, "pad_token_id", None) or 0
    ev = evaluate_sae(loaded.model, sae, eval_seqs, args.layer, mean, skip_first=args.skip_first,
                      pad_id=pad)
    training["metrics"] = {"eval_text": eval_text, "eval_tokens": ev.tokens, "fvu": ev.fvu,
                           "l0": ev.l0,
                           "dead_fraction_eval": ev.dead_fraction, "ce_clean": ev.ce.clean,
                           "ce_spliced": ev.ce.spliced, "ce_mean_ablated": ev.ce.ablated,
                           "ce_increase": ev.ce.increase, "ce_increase_pct": ev.ce.increase_pct}
    sae.save(out)
    print(f"Saved the SAE to {out}: FVU {ev.fvu:.3f}, L0 {ev.l0:.1f}, "
          f"dead {trainer.dead_fraction():.1%}, CE +{ev.ce.increase:.4f} nats "
          f"({ev.ce.increase_pct:.1f}% of mean ablation) on {ev.tokens} held-out tokens.")
    return 0


def _texts(paths: list[str] | None, split: str):
    """Texts of one split of the user's files, or of the cached reference corpus."""
    from latentaudit.data.corpus import load_corpus

    return (doc.text for doc in load_corpus(paths or None, split=split))


def _describe(paths: list[str] | None) -> str:
    if not paths:
        return "reference corpus (latentaudit data fetch), train split"
    return "corpus " + ", ".join(str(Path(p).resolve()) for p in paths) + ", train split"
