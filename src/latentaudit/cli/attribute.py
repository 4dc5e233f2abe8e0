"""``latentaudit attribute``: rank SAE latents by Δ-attribution on a behaviour dataset."""

from __future__ import annotations

import argparse

NAME = "attribute"
HELP = "Rank SAE latents by gradient attribution (Δ-attribution) on a behaviour dataset."
DESCRIPTION = (
    "Rank the SAE latents that cause a behaviour. DATA is a JSONL file of completions labelled "
    "positive (shows the behaviour) or negative; completions of the same prompt are paired. Writes "
    "attribution.safetensors, ranking.jsonl and manifest.json into --out. A killed run resumes "
    "from its checkpoint when rerun with the same arguments.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Model: embedded short name, local folder or hub id.")
    p.add_argument("--sae", required=True, action="append",
                   help="SAE path (any supported format) or 'default' for an embedded model's "
                        "shipped SAE; repeat with --layer for several layers.")
    p.add_argument("--layer", type=int, action="append",
                   help="0-indexed decoder layer whose output the SAE reads (resid_post); "
                        "defaults to the layer recorded in the SAE. Repeat to match each --sae.")
    p.add_argument("--data", required=True, help="Behaviour dataset (JSONL).")
    p.add_argument("--out", required=True, help="Output folder.")
    p.add_argument("--batch-size", type=int, default=8, help="Completions per forward/backward.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
    p.add_argument("--dtype", default="float32", help="Model dtype: float32 or bfloat16.")
    p.add_argument("--abar", default="auto", choices=["auto", "sae", "dataset", "zero"],
                   help="Mean activation for mean ablation: stored with the SAE, the dataset's own "
                        "mean, or zero (auto: the SAE's when it has one, else the dataset's).")
    p.add_argument("--positions", default="all", choices=["all", "completion"],
                   help="Positions summed per completion: all, or the completion only.")
    p.add_argument("--pairing", default="all", choices=["all", "matched"],
                   help="Pairs within a prompt: every positive×negative, or one-to-one.")
    p.add_argument("--no-delta-activation", action="store_true",
                   help="Skip the Δ-activation baseline (saves one SAE encoder pass).")
    p.add_argument("--top-k", type=int, default=100, help="Latents written to ranking.jsonl.")
    p.add_argument("--show", type=int, default=10, help="Latents printed in the summary table.")


def _load_saes(args, model) -> dict:
    from latentaudit.errors import LatentAuditError
    from latentaudit.saes import load_sae

    layers = args.layer or []
    if layers and len(layers) != len(args.sae):
        raise LatentAuditError(
            f"{len(args.sae)} --sae but {len(layers)} --layer given: give one --layer per --sae "
            "or none.")
    saes = {}
    for i, path in enumerate(args.sae):
        if path == "default":
            from latentaudit.saes.shipped import default_sae_path

            path = str(default_sae_path(args.model))
        sae = load_sae(path, device=model.device, dtype="fp32")
        layer = layers[i] if layers else sae.info.layer
        if layer is None:
            raise LatentAuditError(f"{path} does not record its layer: pass --layer.")
        if layer in saes:
            raise LatentAuditError(f"--layer {layer} is given twice.")
        saes[layer] = sae
    return saes


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from latentaudit.attribute import AttributionConfig, attribute
    from latentaudit.attribute.output import write_run
    from latentaudit.data.behaviour import dataset_hash
    from latentaudit.models.load import load_model

    cfg = AttributionConfig(batch_size=args.batch_size, abar=args.abar, positions=args.positions,
                            pairing=args.pairing, top_k=args.top_k,
                            delta_activation=not args.no_delta_activation)
    out = Path(args.out)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    saes = _load_saes(args, model)
    ckpt = out / "attribute.checkpoint.safetensors"
    result = attribute(model, saes, args.data, cfg, checkpoint=ckpt)
    dataset = {"path": str(args.data), "sha256": dataset_hash(args.data)}
    rows = write_run(out, result, saes, model, cfg, dataset)
    ckpt.unlink(missing_ok=True)
    print(f"{result.n_completions} completions, {result.n_pairs} pairs from {result.n_prompts} "
          f"prompts, {result.n_tokens} tokens"
          + (f"; {len(result.skipped_prompts)} prompt(s) skipped (one side only)"
             if result.skipped_prompts else ""))
    for L, la in result.layers.items():
        print(f"\nlayer {L} (ā: {la.abar_source}): top {min(args.show, cfg.top_k)} latents by "
              "Δ-attribution")
        print(f"{'rank':>4} {'latent':>7} {'Δ-attr':>11} {'Δ-act':>9} {'act rank':>8}  logit lens")
        for row in [r for r in rows if r["layer"] == L][: args.show]:
            toks = " ".join(repr(t) for t in row["logit_lens_top_tokens"][:5])
            act = "-" if row["delta_activation"] is None else f"{row['delta_activation']:.3f}"
            print(f"{row['rank']:>4} {row['latent']:>7} {row['delta_attribution']:>11.3e} "
                  f"{act:>9} {row['delta_activation_rank'] or '-':>8}  {toks}")
    print(f"\nwrote {out}/attribution.safetensors, ranking.jsonl, manifest.json")
    return 0
