"""``latentaudit attribute``: rank SAE latents by Δ-attribution on a behaviour dataset."""

from __future__ import annotations

import argparse

from latentaudit import runfolder as rf
from latentaudit.cli import DEVICE_HELP, batch_size_arg, field_docs
from latentaudit.cli._engine import add_engine_options, engine_from_args

NAME = "attribute"
HELP = "Rank SAE latents by gradient attribution (Δ-attribution) on a behaviour dataset."
DESCRIPTION = (
    "Rank the SAE latents that cause a behaviour. DATA is a JSONL file of completions labelled "
    "positive (shows the behaviour) or negative; completions of the same prompt are paired. Writes "
    "attribution.safetensors, ranking.jsonl and manifest.json into --out. A killed run resumes "
    "from its checkpoint when rerun with the same arguments. Every input is checked before the "
    "model loads.")
SHARDS_DIR = "attribute.shards"
"""With --engine ray: the folder of finished shards (removed once the run is written)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    doc = field_docs("attribution/config.py", "AttributionConfig")
    p.add_argument("--model", required=True,
                   help="Model: embedded short name, local folder or hub id.")
    p.add_argument("--sae", required=True, action="append",
                   help="SAE path (any supported format), 'default' for an embedded model's "
                        "shipped SAE, or a public name (org/repo/sub/folder, org/repo:hookpoint, "
                        "saelens:RELEASE/ID); repeat with --layer for several layers.")
    p.add_argument("--layer", type=int, action="append",
                   help="0-indexed decoder layer whose hook point the SAE reads; "
                        "defaults to the layer recorded in the SAE. Repeat to match each --sae.")
    p.add_argument("--data", required=True, help="Behaviour dataset (JSONL).")
    p.add_argument("--out", required=True, help="Output folder.")
    p.add_argument("--batch-size", type=batch_size_arg, default=8, help=doc["batch_size"])
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")
    p.add_argument("--abar", default="auto", choices=["auto", "sae", "dataset", "zero"],
                   help=doc["abar"])
    p.add_argument("--positions", default="all", choices=["all", "completion"],
                   help=doc["positions"])
    p.add_argument("--pairing", default="all", choices=["all", "matched"], help=doc["pairing"])
    p.add_argument("--no-delta-activation", action="store_true",
                   help="Skip the Δ-activation baseline (saves one SAE encoder pass).")
    p.add_argument("--top-k", type=int, default=100, help=doc["top_k"])
    p.add_argument("--hook", default="auto",
                   choices=["auto", "resid_pre", "attn_out", "resid_mid", "mlp_out",
                            "resid_post"],
                   help=doc["hook"])
    p.add_argument("--sae-chunk", type=int, default=0, metavar="N", help=doc["sae_chunk"])
    p.add_argument("--checkpoint-every-batches", type=int, default=20, metavar="N",
                   help=doc["checkpoint_every_batches"])
    p.add_argument("--checkpoint-every-seconds", type=float, default=300.0, metavar="S",
                   help=doc["checkpoint_every_seconds"])
    p.add_argument("--show", type=int, default=10, help="Latents printed in the summary table.")
    add_engine_options(p)


def config_from_args(args: argparse.Namespace):
    """The :class:`~latentaudit.attribution.AttributionConfig` the flags ask for."""
    from latentaudit.attribution import AttributionConfig

    return AttributionConfig(batch_size=args.batch_size, abar=args.abar, positions=args.positions,
                             pairing=args.pairing, top_k=args.top_k, sae_chunk=args.sae_chunk,
                             delta_activation=not args.no_delta_activation,
                             checkpoint_every_batches=args.checkpoint_every_batches,
                             checkpoint_every_seconds=args.checkpoint_every_seconds,
                             hook=args.hook)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from latentaudit.attribution import attribute
    from latentaudit.attribution.output import write_run
    from latentaudit.errors import LatentAuditError
    from latentaudit.saes.shipped import resolve_sae_path

    cfg = config_from_args(args)
    engine = engine_from_args(args)
    if args.show < 0:
        raise LatentAuditError(f"--show must be at least 0, got {args.show}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LatentAuditError(f"--out {out} is a file: pass a folder for the run's files.")
    saes = [resolve_sae_path(s, args.model) for s in args.sae]
    ckpt = out / (SHARDS_DIR if engine.distributed else rf.CHECKPOINT)
    result = attribute(args.model, saes, args.data, cfg, layers=args.layer, checkpoint=ckpt,
                       device=args.device, dtype=args.dtype, engine=engine)
    write_run(out, result)
    if engine.distributed:
        shutil.rmtree(ckpt, ignore_errors=True)
    else:
        ckpt.unlink(missing_ok=True)
    _print_summary(result, args.show)
    print(f"\nwrote {out}/attribution.safetensors, ranking.jsonl, manifest.json")
    return 0


def _print_summary(result, show: int) -> None:
    print(f"{result.n_completions} completions, {result.n_pairs} pairs from {result.n_prompts} "
          f"prompts, {result.n_tokens} tokens"
          + (f"; {len(result.skipped_prompts)} prompt(s) skipped (one side only)"
             if result.skipped_prompts else ""))
    for L, la in result.layers.items():
        print(f"\nlayer {L} (ā: {la.abar_source}): top {min(show, result.config.top_k)} latents "
              "by Δ-attribution")
        print(f"{'rank':>4} {'latent':>7} {'Δ-attr':>11} {'Δ-act':>9} {'act rank':>8}  logit lens")
        for row in [r for r in result.ranking if r.layer == L][:show]:
            toks = " ".join(repr(t) for t in row.logit_lens_top_tokens[:5])
            act = "-" if row.delta_activation is None else f"{row.delta_activation:.3f}"
            print(f"{row.rank:>4} {row.latent:>7} {row.delta_attribution:>11.3e} "
                  f"{act:>9} {row.delta_activation_rank or '-':>8}  {toks}")
