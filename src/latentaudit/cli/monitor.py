"""``latentaudit monitor``: would the latents have flagged the bad completions? Measure it
(``evaluate``), fit a monitor file (``fit``) and apply it to new completions (``score``)."""

from __future__ import annotations

import argparse

from latentaudit.cli._options import Config, Flag

NAME = "monitor"
HELP = "Measure latents as a detector of the behaviour, fit a monitor file and apply it."
DESCRIPTION = (
    "Use SAE latents as a monitor. `evaluate` scores held-out graded completions by each "
    "latent's mean (and max) activation and by a logistic combination of the top K, next to "
    "Δ-activation, random latents and a probe on the raw residual (ROC AUC with bootstrap "
    "intervals, precision at a recall, ROC figure). `fit` writes a monitor file; `score` "
    "applies it to new completions (streaming, resumable).")


EVALUATE = Config("latentaudit.monitor.evaluate", "EvalConfig",
                  top_k=Flag(nargs="+", convert=tuple))
"""The EvalConfig flags of `monitor evaluate` (--batch-size is the readers' shared flag)."""


def _reader(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", help=model_help)
    p.add_argument("--sae", help="SAE path, shipped name or 'default' (default: the run's).")
    p.add_argument("--layer", type=int, help="0-indexed layer (default: the run's / SAE's).")
    p.add_argument("--batch-size", type=int, default=8, help="Completions per forward pass.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")


def _latents(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of latent ids, e.g. "
                                         "'12,345,6789'") from None


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--completions", required=True,
                   help="Graded completions of held-out prompts: judged JSONL (`outcome`) or a "
                        "behaviour dataset (`label`).")
    p.add_argument("--run", help="Attribution run folder: its top-K latents by Δ-attribution "
                                 "and Δ-activation (and its model and SAE).")
    p.add_argument("--latents", type=_latents, help="Latent ids to measure too, e.g. 12,345.")
    p.add_argument("--train", help="Graded completions of other prompts (e.g. the attribution "
                                   "rows): also fit the combinations there and score the "
                                   "evaluation file.")
    p.add_argument("--out", required=True, help="Output folder.")
    EVALUATE.add(p, skip=("batch_size",))
    _reader(p, "Model (default: the run's).")


def _add_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--completions", required=True,
                   help="Graded completions: judged JSONL (`outcome`) or a behaviour dataset.")
    p.add_argument("--run", help="Attribution run folder to take the top-K latents from.")
    p.add_argument("--top-k", type=int, help="How many of the run's top latents to use.")
    p.add_argument("--by", default="attribution", choices=["attribution", "activation"],
                   help="Rank the run's latents by Δ-attribution or Δ-activation.")
    p.add_argument("--latents", type=_latents, help="Latent ids instead of the run's top K.")
    p.add_argument("--reduce", nargs="+", default=["mean"], choices=["mean", "max"],
                   help="Reductions over the completion's tokens the monitor reads.")
    p.add_argument("--recall", type=float, default=0.9,
                   help="Target recall: the threshold is set where cross-validated scores "
                        "reach it.")
    p.add_argument("--folds", type=int, default=5, help="Prompt-held-out folds for λ.")
    p.add_argument("--out", required=True, help="Monitor file to write (.safetensors).")
    _reader(p, "Model (default: the run's).")


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monitor", required=True, help="Monitor file from `monitor fit`.")
    p.add_argument("--completions", required=True, help="Completions JSONL to score.")
    p.add_argument("--out", required=True,
                   help="Scored JSONL (appended to when a killed run is resumed).")
    p.add_argument("--chunk", type=int, default=64, help="Rows held in memory at a time.")
    _reader(p, "Model (default: the monitor's); must be the one it was fit on.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="monitor_action", metavar="ACTION", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    _add_evaluate(sub.add_parser("evaluate", formatter_class=fmt, help=(
        "AUC table of latents vs Δ-activation, random latents and a residual probe on "
        "held-out completions.")))
    _add_fit(sub.add_parser("fit", formatter_class=fmt,
                            help="Fit a monitor file on graded completions."))
    _add_score(sub.add_parser("score", formatter_class=fmt,
                              help="Score new completions with a monitor file (streaming)."))


def _evaluate(args: argparse.Namespace) -> int:
    from latentaudit.monitor.evaluate import run_evaluation
    from latentaudit.monitor.report import TABLE_FILE

    cfg = EVALUATE.build(args)
    run_evaluation(args.completions, args.out, cfg, run=args.run, latents=args.latents,
                   train=args.train, model=args.model, sae=args.sae, layer=args.layer,
                   device=args.device, dtype=args.dtype)
    from pathlib import Path

    print(Path(args.out, TABLE_FILE).read_text(encoding="utf-8"))
    print(f"wrote {args.out}/monitor_eval.json, auc_table.md, latents.jsonl, roc.png, roc.svg")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from latentaudit.monitor.fit import run_fit

    mon = run_fit(args.completions, args.out, run=args.run, top_k=args.top_k, by=args.by,
                  latents=args.latents, model=args.model, sae=args.sae, layer=args.layer,
                  reduce=args.reduce, recall=args.recall, folds=args.folds,
                  batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    f = mon.fit
    print(f"monitor of {len(mon.latents)} latents ({', '.join(mon.reduce)}) at layer "
          f"{mon.layer}: prompt-held-out CV AUC {f['cv_auc']:.3f} (λ {f['l2']:g}); threshold "
          f"{mon.threshold:.3f} gives recall {f['cv_recall']:.2f} at precision "
          f"{f['cv_precision']:.2f} on held-out prompts")
    print(f"wrote {args.out}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from latentaudit.monitor.score import run_score

    s = run_score(args.monitor, args.completions, args.out, model=args.model, sae=args.sae,
                  layer=args.layer, chunk=args.chunk, batch_size=args.batch_size,
                  device=args.device, dtype=args.dtype)
    print(f"scored {s.scored} completion(s) ({s.rows - s.scored} already in {s.out}); "
          f"{s.flagged} flagged; wrote {s.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"evaluate": _evaluate, "fit": _fit, "score": _score}
    return actions[args.monitor_action](args)
