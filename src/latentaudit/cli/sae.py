"""``latentaudit sae``: inspect an SAE in any supported format, or convert it to latentaudit's.

``latentaudit sae info PATH`` prints the format, sizes, nonlinearity, layer, model and whether the
mean activation ā is stored; ``latentaudit sae convert PATH --out DIR`` writes latentaudit's own
format (cfg.json + sae.safetensors), optionally in another dtype.
"""

from __future__ import annotations

import argparse
import json

NAME = "sae"
HELP = "Inspect an SAE (SAELens, sparsify, Gemma Scope, OpenAI) or convert it to latentaudit's."
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


def _load(args: argparse.Namespace):
    from latentaudit.saes.formats import load_sae

    return load_sae(args.path, format=args.format, hookpoint=args.hookpoint, layer=args.layer)


def _summary(sae) -> dict:
    i = sae.info
    return {"path": i.source_path, "format": i.source_format, "d_model": sae.d_model,
            "d_sae": sae.d_sae, "activation": i.activation, "k": i.k, "layer": i.layer,
            "hook": i.hook, "model": i.model, "subtract_b_dec": i.subtract_b_dec,
            "input_norm": i.input_norm, "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
            "mean_activation": sae.mean_activation is not None}


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


def run(args: argparse.Namespace) -> int:
    return _info(args) if args.sae_action == "info" else _convert(args)
