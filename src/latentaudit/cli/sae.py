"""``latentaudit sae``: inspect, convert or evaluate an SAE in any supported format.

``latentaudit sae info PATH`` prints the format, sizes, nonlinearity, layer, model and whether the
mean activation ā is stored; ``latentaudit sae convert PATH --out DIR`` writes latentaudit's own
format (cfg.json + sae.safetensors), optionally in another dtype; ``latentaudit sae evaluate PATH
... --model MODEL`` measures FVU, L0, never-firing latents and the CE-loss increase on held-out
corpus text and on books outside the training mix.
"""

from __future__ import annotations

import argparse
import json

NAME = "sae"
HELP = ("Inspect, convert or evaluate an SAE (latentaudit, SAELens, sparsify, Gemma Scope, "
        "OpenAI).")
DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="SAE folder or weights file.")
    parser.add_argument("--format", default="auto",
                        choices=["auto", "latentaudit", "saelens", "sparsify", "gemma_scope",
                                 "openai"],
                        help="Format of PATH; auto detects it from the files.")
    parser.add_argument("--hookpoint", default=None,
                        help="Subfolder to load from a checkpoint folder with one SAE per "
                             "hookpoint (e.g. layers.12).")
    parser.add_argument("--layer", type=int, default=None,
                        help="0-indexed layer: picks layers.<layer> from a checkpoint folder, or "
                             "records the layer when the format does not.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sae_action", metavar="ACTION", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    info = sub.add_parser("info", help="Print what an SAE is and where it belongs.",
                          formatter_class=fmt)
    _add_source(info)
    info.add_argument("--json", action="store_true", help="Print one JSON object instead.")
    convert = sub.add_parser("convert", help="Write an SAE in latentaudit's own format.",
                             formatter_class=fmt)
    _add_source(convert)
    convert.add_argument("--out", required=True, metavar="DIR",
                         help="Folder to write cfg.json + sae.safetensors into.")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                         help="Weight dtype to write (default: keep the source's).")
    _add_evaluate(sub.add_parser(
        "evaluate", formatter_class=fmt,
        help="FVU, L0, never-firing latents and CE-loss increase on held-out text."))


def _add_evaluate(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("paths", nargs="+", metavar="PATH",
                    help="SAE folders or files, all at the same layer (latentaudit's format, or "
                         "any other: then pass --layer); `default` is the model's shipped SAE.")
    ev.add_argument("--model", required=True, help="Embedded short name, folder or hub id.")
    ev.add_argument("--layer", type=int, default=None,
                    help="0-indexed layer (default: the one the SAEs record).")
    ev.add_argument("--text", nargs="+", default=["held-out", "outside"], metavar="TEXT",
                    help="held-out (the corpus's held-out split), outside (books outside the "
                         "training mix: `latentaudit data fetch --sources gutenberg`), or "
                         ".txt/.jsonl files; a `latentaudit sample` output is read as its "
                         "completions with their prompts, in the model's chat format (e.g. a "
                         "fine-tune's own replies against its base model's).")
    ev.add_argument("--tokens", type=int, default=100_000,
                    help="Positions per text for FVU, L0 and never-firing latents.")
    ev.add_argument("--ce-tokens", type=int, default=4096,
                    help="Positions per text for the CE-loss increase (its first sequences).")
    ev.add_argument("--batch-size", type=int, default=16, help="Sequences per forward pass.")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")
    ev.add_argument("--json", action="store_true", help="Print one JSON object per line.")
    ev.add_argument("--record", action="store_true",
                    help="Also store the results, with this command, under 'evaluation' in each "
                         "SAE's cfg.json (latentaudit format only).")


def _load(args: argparse.Namespace):
    from latentaudit.saes.formats import load_sae

    return load_sae(args.path, format=args.format, hookpoint=args.hookpoint, layer=args.layer)


def _summary(sae) -> dict:
    i = sae.info
    return {"path": i.source_path, "format": i.source_format, "d_model": sae.d_model,
            "d_sae": sae.d_sae, "activation": i.activation, "k": i.k, "layer": i.layer,
            "hook": i.hook, "model": i.model, "subtract_b_dec": i.subtract_b_dec,
            "input_norm": i.input_norm, "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
            "mean_activation": sae.mean_activation is not None,
            "hub": f"{i.hub['repo']}@{i.hub['revision']}/{i.hub['path']}" if i.hub else None,
            "neuronpedia": i.extra.get("neuronpedia_id")}


def _info(args: argparse.Namespace) -> int:
    summary = _summary(_load(args))
    if args.json:
        print(json.dumps(summary))
        return 0
    shown = {**summary, "mean_activation": "yes" if summary["mean_activation"] else "no"}
    for key, value in shown.items():
        print(f"{key + ':':<17}{'-' if value is None else value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from latentaudit.errors import LatentAuditError
    from latentaudit.saes.formats import DTYPES

    sae = _load(args)
    out = Path(args.out).expanduser()
    source = Path(sae.info.source_path)
    if out.resolve() in (source.resolve(), source.parent.resolve()):
        raise LatentAuditError(f"--out {out} is where the source SAE lives: pick another folder "
                               "so its files are not overwritten.")
    if sae.info.source_format != "latentaudit":
        sae.info.extra["converted_from"] = f"{sae.info.source_format}:{sae.info.source_path}"
    sae.save(out, dtype=DTYPES[args.dtype] if args.dtype else None)
    dtype = args.dtype or str(sae.W_dec.dtype).removeprefix("torch.")
    print(f"wrote {out} (latentaudit format, {dtype}; from {sae.info.source_format}: "
          f"d_model={sae.d_model}, d_sae={sae.d_sae}, {sae.info.activation})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from latentaudit.errors import LatentAuditError
    from latentaudit.models.load import load_model, resolve_device
    from latentaudit.saes.evaluate import EvalConfig, evaluate_on_texts, text_documents
    from latentaudit.saes.formats import load_sae
    from latentaudit.saes.shipped import resolve_sae_path

    cfg = EvalConfig(tokens=args.tokens, ce_tokens=args.ce_tokens, batch_size=args.batch_size)
    saes = {p: load_sae(resolve_sae_path(p, args.model), layer=args.layer, dtype="fp32")
            for p in args.paths}  # fp16 matmuls are slow on CPUs
    layers = {s.info.layer for s in saes.values()}
    if args.layer is None and (len(layers) != 1 or None in layers):
        raise LatentAuditError(f"the SAEs record layers {sorted(map(str, layers))}: give the "
                               "layer they all sit at with --layer.")
    layer = args.layer if args.layer is not None else layers.pop()
    first = next(iter(saes.values()))
    if first.mean_activation is None:
        raise LatentAuditError(f"{args.paths[0]} stores no mean activation ā for the mean-"
                               "ablation baseline: list an SAE that has one first.")
    if args.record:
        foreign = [p for p, s in saes.items() if s.info.source_format != "latentaudit"]
        if foreign:
            raise LatentAuditError(f"--record writes into latentaudit's cfg.json, and {foreign[0]}"
                                   " is in another format: convert it with `latentaudit sae "
                                   "convert` first.")
    for text in args.text:
        text_documents(text)  # a missing corpus or file fails before the model loads
    loaded = load_model(args.model, device=str(resolve_device(args.device)), dtype=args.dtype)
    rows = [r.row() for r in evaluate_on_texts(loaded, saes, layer, args.text, cfg,
                                               first.mean_activation)]
    if args.record:
        _record(saes, rows, args)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['sae']}  {r['text']}: FVU {r['fvu']:.3f}  L0 {r['l0']:.1f}  never fired "
                  f"{r['dead_fraction']:.1%} ({r['tokens']:,} tokens)  CE +{r['ce_increase']:.3f}"
                  f" nats = {r['ce_increase_pct']:.1f}% of mean ablation ({r['ce_tokens']:,} "
                  "tokens)")
    return 0


def _record(saes: dict, rows: list[dict], args: argparse.Namespace) -> None:
    """Store each SAE's rows under 'evaluation' in its cfg, keyed by text, each with the
    command that reproduces it (results for other texts are kept)."""
    import shlex
    from pathlib import Path

    from latentaudit._io import write_json
    from latentaudit.saes.sae import CONFIG_FILE

    command = shlex.join(["latentaudit", "sae", "evaluate", *args.paths, "--model", args.model,
                          "--text", *args.text, "--tokens", str(args.tokens),
                          "--ce-tokens", str(args.ce_tokens)])
    for name, sae in saes.items():
        path = Path(sae.info.source_path)
        cfg_file = (path if path.is_dir() else path.parent) / CONFIG_FILE
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        results = cfg.get("evaluation", {}).get("results", {})
        results.update({r["text"]: {**{k: v for k, v in r.items() if k not in ("sae", "text")},
                                    "command": command} for r in rows if r["sae"] == name})
        cfg["evaluation"] = {"results": results}
        write_json(cfg_file, cfg)


def run(args: argparse.Namespace) -> int:
    actions = {"info": _info, "convert": _convert, "evaluate": _evaluate}
    return actions[args.sae_action](args)
