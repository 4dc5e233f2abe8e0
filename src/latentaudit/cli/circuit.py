"""``latentaudit circuit``: attribute a run's top latents to the latents of earlier layers."""

from __future__ import annotations

import argparse

from latentaudit.cli._options import Config, Flag

NAME = "circuit"
HELP = "Attribute a run's top latents to the latents of earlier layers and draw the circuit."
DESCRIPTION = (
    "For the top latents of an attribution run (--from RUN, the --out folder of `latentaudit "
    "attribute`) or given ones (--targets), attribute each to every latent of an SAE at an "
    "earlier layer (--upstream-sae, --upstream-layer): the first-order change of the target's "
    "contribution to the loss (or of its pre-activation, --measure) when the upstream latent is "
    "mean-ablated, as Δ over the run's pairs. One backward per target from its layer down; "
    "repeat --upstream-sae for a chain over more layers (the strongest upstream latents of one hop "
    "are the targets of the next). Edges are pruned per target to those holding --fraction of its "
    "total |Δ-edge|. Writes RUN/circuit/circuit.json and circuit.safetensors; `latentaudit "
    "report` draws the graph. Every input is checked before the model loads; a killed pass "
    "resumes when rerun.")


CONFIG = Config("latentaudit.circuit.config", "CircuitConfig",
                checkpoint_every_batches=Flag(metavar="N"),
                checkpoint_every_seconds=Flag(metavar="S"))
"""The CircuitConfig flags (each written once, as its field; here only where a flag differs)."""
CHECKPOINTS = ("checkpoint_every_batches", "checkpoint_every_seconds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="run", metavar="RUN", required=True,
                   help="Run folder of `latentaudit attribute` (its --out).")
    p.add_argument("--upstream-sae", action="append", required=True, metavar="SAE",
                   help="SAE of an earlier layer (path or shipped name); repeat for a chain "
                        "over more layers.")
    p.add_argument("--upstream-layer", type=int, action="append", metavar="L",
                   help="Layer of each --upstream-sae (default: the layer it records).")
    p.add_argument("--layer", type=int, help="Layer of the targets when the run has several.")
    p.add_argument("--targets", help="Target latent ids at that layer, e.g. 12,87 (default: the "
                                     "top --top-k of the run's ranking).")
    CONFIG.add(p, "top_k", "measure", "fraction", "max_edges", "abar", "max_prompts")
    CONFIG.add(p, skip=CHECKPOINTS)
    p.add_argument("--cache-dir", help="Folder of explain's top-activating-examples cache "
                                       "(default $LATENTAUDIT_CACHE or ~/.cache/latentaudit).")
    p.add_argument("--model", help="Model (default: the run's); embedded name, folder or hub id.")
    p.add_argument("--sae", help="The run's SAE (path or shipped name), when its file has moved.")
    p.add_argument("--data", help="Behaviour dataset, when the run's file has moved.")
    p.add_argument("--out", help="Output folder (default RUN/circuit).")
    CONFIG.add(p, *CHECKPOINTS)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    p.add_argument("--dtype", default="float32", help="Model dtype: float32 or bfloat16.")
    p.add_argument("--show", type=int, default=5, help="Edges printed per target.")


def run(args: argparse.Namespace) -> int:
    from latentaudit.circuit import trace_circuit
    from latentaudit.errors import LatentAuditError
    from latentaudit.explain.run import parse_latents, read_run
    from latentaudit.saes.shipped import resolve_sae_path

    if args.show < 0:
        raise LatentAuditError(f"--show must be at least 0, got {args.show}.")
    cfg = CONFIG.build(args)
    targets = parse_latents(args.targets, "--targets") if args.targets is not None else None
    model = args.model or read_run(args.run).model_name
    upstream = [resolve_sae_path(s, model) for s in args.upstream_sae]
    sae = resolve_sae_path(args.sae, model) if args.sae else None
    result = trace_circuit(args.run, upstream, cfg, upstream_layers=args.upstream_layer,
                           layer=args.layer, targets=targets, model=args.model, sae=sae,
                           data=args.data, out=args.out, cache_dir=args.cache_dir,
                           device=args.device, dtype=args.dtype)
    _print_summary(result, args.show)
    print(f"\nwrote {result.out}/circuit.json, circuit.safetensors")
    return 0


def _print_summary(result, show: int) -> None:
    g = result.graph
    print(f"{len(g['nodes'])} nodes, {len(g['edges'])} edges over layers "
          f"{', '.join(map(str, g['layers']))} (measure: {g['measure']})")
    lens = {n["id"]: " ".join(repr(t) for t in n["logit_lens"][:3]) for n in g["nodes"]}
    for hop in g["hops"]:
        print(f"\nlayer {hop['upstream_layer']} → layer {hop['target_layer']} "
              f"({hop['route']}, ā: {hop['abar_source']})")
        for i, share in zip(hop["targets"], hop["kept_share"], strict=True):
            tid = f"{hop['target_layer']}:{i}"
            kept = "-" if share is None else f"{share:.0%}"
            print(f"  target {i:>6} ({kept} of |Δ-edge| kept)  {lens.get(tid, '')}")
            for e in [e for e in g["edges"] if e["target"] == tid][:show]:
                print(f"    {e['source']:>10} {e['weight']:>+11.3e}  {lens.get(e['source'], '')}")
