"""``latentaudit pair``: judged completions -> behaviour dataset with positive/negative pairs."""

from __future__ import annotations

import argparse

NAME = "pair"
HELP = "Turn judged completions into a positive/negative behaviour dataset and count pairs."
DESCRIPTION = (
    "Apply the rubric's threshold rule to judged completions (from `latentaudit judge`), write "
    "positives and negatives as a behaviour dataset for `latentaudit attribute`, and print "
    "per-prompt counts and the number of pairs.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judged", required=True, help="Judged JSONL (from `latentaudit judge`).")
    p.add_argument("--out", required=True, help="Output dataset JSONL.")
    p.add_argument("--rubric", help="Rubric whose threshold rule to apply (default: the one the "
                                    "completions were judged with); e.g. an edited copy.")
    p.add_argument("--pairing", default="all", choices=["all", "matched"],
                   help="Pairs within a prompt: every positive×negative, or one-to-one.")
    p.add_argument("--show", type=int, default=30, help="Prompts listed in the count table.")


def run(args) -> int:
    from collections import Counter

    from latentaudit.pair import pair_file

    result = pair_file(args.judged, args.out, args.rubric, args.pairing)
    width = min(48, max(len("prompt_id"), *(len(p) for p in result.counts)))
    print(f"{'prompt_id':<{width}}  {'pos':>4} {'neg':>4} {'excl':>5}")
    for i, (pid, c) in enumerate(result.counts.items()):
        if i == args.show:
            print(f"... and {len(result.counts) - args.show} more prompts")
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
    print(f"{len(result.pairing.pairs)} pairs ({args.pairing}) from {both} of "
          f"{len(result.counts)} prompts with both a positive and a negative completion")
    print(f"wrote {len(result.rows)} completions to {args.out}")
    return 0
