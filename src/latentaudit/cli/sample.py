"""``latentaudit sample``: sample on-policy completions of a prompt set from a model."""

from __future__ import annotations

import argparse
import re

from latentaudit.cli import DEVICE_HELP, batch_size_arg
from latentaudit.cli._options import Config, Flag

NAME = "sample"
HELP = "Sample N completions per prompt from a model (resumable JSONL with token ids)."
DESCRIPTION = (
    "Sample N completions per prompt from the model under study into a JSONL file (prompt and "
    "completion token ids included) with <stem>.manifest.json beside it. Rerunning the same "
    "command after an interruption continues where it stopped; --n may grow on a rerun, the "
    "other sampling parameters may not change.")

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turn the escapes \n, \t and \\ typed on a command line into the characters."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


CONFIG = Config("latentaudit.sample", "SampleConfig",
                stop=Flag(nargs="+", extend=True, metavar="STR",
                          suffix=" Escapes \\n and \\t are understood.",
                          convert=lambda stops: tuple(unescape(s) for s in stops)),
                batch_size=Flag(type=batch_size_arg))
"""The SampleConfig flags (each written once, as its field; here only where a flag differs)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentaudit.cli._engine import add_engine_options

    p.add_argument("--model", required=True,
                   help="Model: embedded short name, local folder or hub id.")
    p.add_argument("--prompts", required=True,
                   help="Prompts: a JSONL file (prompt_id, prompt as text or chat messages, "
                        "optional system, meta; other fields go into meta), a .txt file with one "
                        "prompt per line, or a built-in suite name.")
    p.add_argument("--out", required=True, help="Output JSONL file of completions.")
    CONFIG.add(p, "n", "system")
    CONFIG.add(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16, float16.")
    add_engine_options(p)


def run(args: argparse.Namespace) -> int:
    import json

    from latentaudit.cli._engine import engine_from_args
    from latentaudit.judges.base import check_model_options
    from latentaudit.models.load import load_model, parse_dtype
    from latentaudit.sample import plan_sampling, run_sampling

    cfg = CONFIG.build(args)
    check_model_options(args.device, args.dtype, cfg.batch_size or 1)  # 0: auto
    engine = engine_from_args(args)
    dtype = str(parse_dtype(args.dtype)).removeprefix("torch.")
    plan = plan_sampling(args.prompts, cfg, args.out, model=args.model, dtype=dtype)
    if (plan.todo or plan.previous is None) and engine.distributed:
        out = engine.sample(args.model, plan, args.device, args.dtype)
    elif plan.todo or plan.previous is None:
        out = run_sampling(load_model(args.model, device=args.device, dtype=args.dtype), plan)
    else:  # every completion is there, sampled with these parameters
        out = plan.out
    counts: dict[str, int] = {}
    with open(out, encoding="utf-8") as f:
        for line in f:
            reason = json.loads(line)["finish_reason"]
            counts[reason] = counts.get(reason, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{sum(counts.values())} completions in {out} (finish: {summary})")
    return 0
