"""``latentaudit pair``: judged completions -> behaviour dataset with positive/negative pairs."""

from __future__ import annotations

import argparse

from latentaudit.cli._options import Config

NAME = "pair"
HELP = "Turn judged completions into a positive/negative behaviour dataset and count pairs."
DESCRIPTION = (
    "Apply the rubric's threshold rule to judged completions (from `latentaudit judge`), write "
    "positives and negatives as a behaviour dataset for `latentaudit attribute`, and print "
    "per-prompt counts and the number of pairs.")

CONFIG = Config("latentaudit.pair", "PairConfig")
"""The PairConfig flags (each written once, as its field)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    CONFIG.add(p)


def run(args) -> int:
    from collections import Counter

    from latentaudit.pair import pair_file

    cfg = CONFIG.build(args)
    result = pair_file(cfg.judged, cfg.out, cfg.rubric, cfg.pairing)
    width = min(48, max(len("prompt_id"), *(len(p) for p in result.counts)))
    print(f"{'prompt_id':<{width}}  {'pos':>4} {'neg':>4} {'excl':>5}")
    for i, (pid, c) in enumerate(result.counts.items()):
        if i == cfg.show:
            print(f"... and {len(result.counts) - cfg.show} more prompts")
            break
        short = pid if len(pid) <= width else pid[: width - 3] + "..."
        print(f"{short:<{width}}  {c['positive']:>4} {c['negative']:>4} {c['excluded']:>5}")
    total = Counter()
    for c in result.counts.values():
        total.update(c)
    print(f"{'total':<{width}}  {total['positive']:>4} {total['negative']:>4} "
          f"{total['excluded']:>5}")
    if result.reasons:
        print("excluded: " + ", ".join(f"{why} ({n})" for why, n in result.reasons.most_common()))
    both = len(result.counts) - len(result.pairing.skipped_prompts)
    print(f"{len(result.pairing.pairs)} pairs ({cfg.pairing}) from {both} of "
          f"{len(result.counts)} prompts with both a positive and a negative completion")
    print(f"wrote {len(result.rows)} completions to {cfg.out}")
    return 0
