"""``latentaudit explain``: read the latents of an attribution run, and check δ against the exact
effect."""

from __future__ import annotations

import argparse

from latentaudit.cli import DEVICE_HELP, batch_size_arg
from latentaudit.cli._engine import add_engine_options, engine_from_args
from latentaudit.cli._options import Config, Flag

NAME = "explain"
HELP = "Explain a run's top latents: logit lens, top-activating text, per-token maps, exact check."
DESCRIPTION = (
    "Explain the top latents of an attribution run (--from RUN, the --out folder of `latentaudit "
    "attribute`) or given ones (--latents): their logit lens, top-activating examples and "
    "activation density on reference text (cached per SAE), per-token attribution maps on the "
    "run's completions, and the exact mean-ablation effect against the first-order δ (Spearman ρ; "
    "--rescore K re-ranks the top K by it). Writes RUN/explain/. With --across RUN1 RUN2 ..., "
    "lists the latents in the top of several runs of one model and SAE instead.")


CONFIG = Config("latentaudit.explain.config", "ExplainConfig",
                batch_size=Flag(type=batch_size_arg),
                maps=Flag(help="Skip the per-token attribution maps (the exact check still maps "
                               "its own sample)."),
                rescore=Flag(metavar="K"), exact_top=Flag(metavar="K"),
                effect_texts=Flag(metavar="N"), effect_strength=Flag(metavar="S"))
"""The ExplainConfig flags (each written once, as its field; here only where a flag differs)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="run", metavar="RUN",
                     help="Run folder of `latentaudit attribute` (its --out).")
    src.add_argument("--across", nargs="+", metavar="RUN",
                     help="Two or more run folders of one model and SAE: list the latents in "
                          "the top --top-k of at least --min-runs of them.")
    p.add_argument("--latents", help="Latent ids to explain, e.g. 12,87 (default: the top "
                                     "--top-k of the run's ranking).")
    p.add_argument("--layer", type=int, help="Layer of --latents when the run has several.")
    CONFIG.add(p, "top_k")
    p.add_argument("--model", help="Model (default: the run's); embedded name, folder or hub id.")
    p.add_argument("--sae", help="SAE path or 'default', when the run's SAE file has moved.")
    p.add_argument("--data", help="Behaviour dataset, when the run's file has moved.")
    p.add_argument("--out", help="Output folder (default RUN/explain); with --across, a file "
                                 "for across.json.")
    CONFIG.add(p, "corpus", "corpus_tokens", "context_len", "skip_first")
    CONFIG.add(p)
    p.add_argument("--min-runs", type=int, default=2,
                   help="With --across: the fewest runs a latent must be in the top of.")
    p.add_argument("--cache-dir", help="Folder of the top-activating-examples cache (default "
                                       "$LATENTAUDIT_CACHE or ~/.cache/latentaudit).")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")
    p.add_argument("--show", type=int, default=10, help="Latents printed in the summary.")
    p.add_argument("--neuronpedia-list", metavar="FILE",
                   help="Also write the explained latents as a Neuronpedia list (JSON with the "
                        "quick-list URL to open in a browser); needs an SAE from a known public "
                        "release.")
    add_engine_options(p)


def run(args: argparse.Namespace) -> int:
    from latentaudit.errors import LatentAuditError

    if args.show < 0:
        raise LatentAuditError(f"--show must be at least 0, got {args.show}.")
    if args.across:
        return _across(args)
    from latentaudit.explain import explain_latents
    from latentaudit.explain.run import parse_latents, read_run
    from latentaudit.saes.shipped import resolve_sae_path

    cfg = CONFIG.build(args)
    engine = engine_from_args(args)
    latents = parse_latents(args.latents) if args.latents is not None else None
    model = args.model or read_run(args.run).model_name
    sae = resolve_sae_path(args.sae, model) if args.sae else None
    if args.neuronpedia_list:
        _check_neuronpedia(args.run, sae)
    result = explain_latents(args.run, latents, cfg, layer=args.layer, model=args.model, sae=sae,
                             data=args.data, out=args.out, cache_dir=args.cache_dir,
                             device=args.device, dtype=args.dtype, engine=engine)
    _print_summary(result, args.show)
    if args.neuronpedia_list:
        _write_neuronpedia_list(result, args.neuronpedia_list)
    print(f"\nwrote {result.out}/ (" + ", ".join(sorted(p.name for p in result.out.iterdir()
                                                      if not p.name.startswith("."))) + ")")
    return 0


def _print_summary(result, show: int) -> None:
    m = result.manifest
    corpus = m["corpus"]
    print(f"{len(result.latents)} latents; examples from {corpus['tokens']} tokens of "
          f"'{corpus['spec']}'")
    for warning in corpus["content_warnings"]:
        print(f"content warning: {warning}")
    for L, e in m["exactness"].items():
        rho = "n/a" if e["spearman"] is None else f"{e['spearman']:.2f}"
        per = e["spearman_per_completion_mean"]
        print(f"layer {L}: exact vs first-order Δ over {e['pairs']} pairs: Spearman {rho}"
              + ("" if per is None else f" (per completion, mean {per:.2f})")
              + f" [{e['route']}]")
    print(f"\n{'rank':>4} {'final':>5} {'layer':>5} {'latent':>7} {'Δ-attr':>10} {'exact Δ':>10} "
          f"{'freq':>7}  promoted / top example")
    for r in result.latents[:show]:
        exact = "-" if r["exact_delta"] is None else f"{r['exact_delta']:.3e}"
        promoted = " ".join(repr(t["token"]) for t in r["logit_lens"]["promoted"][:4])
        ex = r["top_examples"][0] if r["top_examples"] else None
        text = "" if ex is None else "".join(ex["tokens"][max(0, ex["max_index"] - 6):
                                                          ex["max_index"] + 1])
        print(f"{r['rank'] or '-':>4} {r['final_rank'] or '-':>5} {r['layer']:>5} "
              f"{r['latent']:>7} {r['delta_attribution']:>10.3e} {exact:>10} "
              f"{r['density']['frequency']:>7.4f}  {promoted} | {text!r}")
        if r["explanation"]:
            print(f"{'':>46}{r['explanation']}")
        if r.get("neuronpedia_url"):
            print(f"{'':>46}{r['neuronpedia_url']}")


def _check_neuronpedia(run_folder: str, sae: str | None) -> None:
    """--neuronpedia-list needs an SAE with Neuronpedia pages: checked before the model loads."""
    from latentaudit.errors import LatentAuditError
    from latentaudit.explain.run import read_run
    from latentaudit.saes.hub import neuronpedia_id_of

    entries = (read_run(run_folder).manifest.get("saes") or {}).values()
    ids = [neuronpedia_id_of(sae)] if sae else [
        e.get("neuronpedia_id") or neuronpedia_id_of(e.get("path") or "") for e in entries]
    if not any(ids):
        raise LatentAuditError(
            f"--neuronpedia-list: the SAE of {run_folder} is not from a public release "
            "latentaudit knows, so its latents have no Neuronpedia pages; load it by its hub or "
            "SAELens name (e.g. saelens:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/"
            "canonical) or drop the flag.")


def _write_neuronpedia_list(result, path: str) -> None:
    from pathlib import Path

    from latentaudit._io import write_json
    from latentaudit.saes.releases import neuronpedia_list, split_url

    rows = [r for r in result.latents if r.get("neuronpedia_url")]
    listed = neuronpedia_list(
        f"latentaudit {Path(result.out).parent.name or 'run'}",
        [(*split_url(r["neuronpedia_url"]), r["explanation"] or "promoted: " + " ".join(
            t["token"] for t in r["logit_lens"]["promoted"][:5])) for r in rows])
    write_json(path, listed)
    print(f"\nwrote {path}: {len(rows)} latents as a Neuronpedia list; open it at\n{listed['url']}")


def _across(args: argparse.Namespace) -> int:

    from latentaudit._io import write_json
    from latentaudit.explain import across_runs
    from latentaudit.explain.across import run_names

    table = across_runs(args.across, top_k=args.top_k, min_runs=args.min_runs)
    rows = table["latents"]
    print(f"{len(rows)} latent(s) in the top {args.top_k} of at least {args.min_runs} of "
          f"{len(args.across)} runs")
    if rows:
        names = run_names(table["runs"])
        print(f"{'layer':>5} {'latent':>7}  " + "  ".join(f"{n[:12]:>12}" for n in names))
        for r in rows:
            print(f"{r['layer']:>5} {r['latent']:>7}  " + "  ".join(
                f"{'-' if k is None else k:>12}" for k in r["ranks"]))
    _print_overlap(table)
    if args.out:
        write_json(args.out, table)
        print(f"\nwrote {args.out}")
    return 0


def _print_overlap(table: dict) -> None:
    from latentaudit.explain.across import run_names

    names = run_names(table["runs"])
    if not table.get("overlap"):
        return
    print("\ntop-K overlap against two unrelated rankings (expected K²/N, P(overlap ≥ seen)):")
    for o in table["overlap"]:
        i, j = o["runs"]
        print(f"  {names[i]} × {names[j]}, layer {o['layer']}, K={o['k']:>3}: "
              f"{o['overlap']} shared (chance {o['expected']:.3g}, p = {o['p_value']:.3g})")
