"""``latentaudit train-judge``: fit a probe judge on a local model from labelled completions."""

from __future__ import annotations

import argparse

NAME = "train-judge"
HELP = "Train a probe judge (a linear probe on a local model) from labelled completions."
DESCRIPTION = (
    "Fit, for every labelled choice question of the rubric, a linear probe on the residual "
    "stream of a local model that rereads each conversation and is asked about its reply. "
    "Layers, pooling and the L2 penalty are chosen by cross-validation that holds out whole "
    "prompts; the held-out accuracy and confusion matrix are printed and stored in the file. "
    "Use the result with `latentaudit judge --judge probe:FILE`.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Model to read: an embedded short name, a local folder or a hub id.")
    p.add_argument("--rubric", required=True, help="Shipped rubric name or a rubric JSON file.")
    p.add_argument("--completions", required=True,
                   help="Completions JSONL (from `latentaudit sample`).")
    p.add_argument("--labels", required=True, action="append",
                   help="Human labels (.csv / .jsonl from `latentaudit judge --export-labels`, "
                        "or rows with prompt_id, sample_index and a column per question); "
                        "repeat for several files.")
    p.add_argument("--out", required=True, help="Output probe file (.safetensors).")
    p.add_argument("--layers", help="Comma-separated candidate layers (default: six spread "
                                    "over the depth).")
    p.add_argument("--folds", type=int, default=10, help="Cross-validation folds (by prompt).")
    p.add_argument("--max-readings", type=int, default=2,
                   help="Most (layer, pooling) readings one probe may combine.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16.")
    p.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass.")


def _layers(text: str | None) -> list[int] | None:
    from latentaudit.errors import LatentAuditError

    if not text:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = [-1]
    if not layers or min(layers) < 0:
        raise LatentAuditError(f"--layers {text}: write layer numbers (0 or more) separated by "
                               "commas, e.g. 8,12,16.")
    return layers


def run(args) -> int:
    from latentaudit.errors import LatentAuditError
    from latentaudit.judges import load_rubric
    from latentaudit.judges.base import check_model_options
    from latentaudit.judges.probe_train import check_labels, labels_from_files, train_probe
    from latentaudit.judges.run import items_from_rows, read_completions
    from latentaudit.models.load import load_model

    if not args.out.endswith(".safetensors"):
        raise LatentAuditError(f"--out {args.out}: name the probe file *.safetensors.")
    layers = _layers(args.layers)
    check_model_options(args.device, args.dtype, args.batch_size)
    rubric = load_rubric(args.rubric)
    items = items_from_rows(read_completions(args.completions), rubric, args.completions)
    labels = labels_from_files(items, rubric, args.labels)
    check_labels(rubric, items, labels, args.folds, args.max_readings)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    probe = train_probe(lm, rubric, items, labels, layers=layers, folds=args.folds,
                        max_readings=args.max_readings, batch_size=args.batch_size)
    for name, head in probe.heads.items():
        cv = head.cv
        print(f"question '{name}': {cv['n']} labelled completions of {cv['prompts']} prompts; "
              f"readings {' + '.join(map(str, head.readings))}, L2 {head.l2:g}")
        print(f"  held-out-prompt accuracy ({cv['folds']}-fold): {cv['accuracy']:.1%}")
        width = max(len(lb) for lb in head.labels) + 2
        print("  " + "label \\ probe".ljust(width) + "".join(lb.rjust(width)
                                                           for lb in head.labels))
        for lb, row in zip(head.labels, cv["confusion"], strict=True):
            print("  " + lb.ljust(width) + "".join(str(n).rjust(width) for n in row))
    probe.save(args.out)
    print(f"wrote {args.out}; use it with: latentaudit judge --rubric {args.rubric} "
          f"--judge probe:{args.out} ...")
    return 0
