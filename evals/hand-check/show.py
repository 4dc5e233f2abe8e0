"""Print what the hand check reads for each latent: the one-line description the report writes
(``describe_examples``), the logit lens, the output effect and the top 10 examples.

    PYTHONPATH=src python evals/hand-check/show.py [LATENT ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from latentaudit.report.render import visible
from latentaudit.report.sections.explain import describe_examples

HERE = Path(__file__).parent
SETS = json.loads((HERE.parent / "false-belief" / "steering" / "sweep" /
                   "steering_summary.json").read_text(encoding="utf-8"))["sets"]


def tokens(rows: list[dict], n: int = 10) -> str:
    return " ".join(repr(t["token"]) for t in rows[:n])


def card(row: dict) -> str:
    lens, eff = row["logit_lens"], row["output_effect"] or {}
    methods = [f"{m} #{ids.index(row['latent']) + 1}" for m, ids in SETS.items()
               if row["latent"] in ids]
    d = row["density"]
    lines = [f"== latent {row['latent']} ({', '.join(methods)}): fires on {d['fired']} of "
             f"{d['tokens']} tokens",
             f"description: {describe_examples(row['top_examples'])}",
             f"lens cosine:     {' '.join(repr(t) for t in lens['cosine'])}",
             f"lens promoted:   {tokens(lens['promoted'])}",
             f"lens suppressed: {tokens(lens['suppressed'])}"]
    for edit in ("added", "ablated"):
        for way in ("rises", "falls"):
            lines.append(f"effect {edit} {way}: {tokens((eff.get(edit) or {}).get(way) or [])}")
    for n, ex in enumerate(row["top_examples"][:10], 1):
        toks, j = list(ex["tokens"]), ex["max_index"]
        toks[j] = f"[[{toks[j]}]]"
        lines.append(f"  {n:2d} {ex['activation']:6.2f} {visible(''.join(toks))}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    wanted = {int(a) for a in argv}
    with (HERE / "explain" / "latents.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if not wanted or row["latent"] in wanted:
                print(card(row), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
