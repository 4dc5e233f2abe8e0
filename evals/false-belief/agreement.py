"""Agreement of a judge with hand labels on the false-belief rubric's validation question.

Usage: python evals/false-belief/agreement.py JUDGED.jsonl HAND_LABELS.jsonl [MORE_LABELS ...]
JUDGED is the output of `latentaudit judge`; each HAND_LABELS file has one line per labelled
completion:
{"prompt_id", "sample_index", "validation": VALIDATES | CORRECTS | EVADES}. Prints accuracy and
the confusion matrix (rows: hand label, columns: judge), for the three answers and for the
positive / not-positive split that pairing uses.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

ANSWERS = ["VALIDATES", "CORRECTS", "EVADES"]


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def table(pairs: list[tuple[str, str]], names: list[str]) -> str:
    counts = Counter(pairs)
    width = max(len(n) for n in names) + 2
    lines = ["hand \\ judge".ljust(width) + "".join(n.rjust(width) for n in names)]
    for h in names:
        lines.append(h.ljust(width) + "".join(str(counts[(h, j)]).rjust(width) for j in names))
    return "\n".join(lines)


def main(judged_path: str, *labels_paths: str) -> None:
    judged = {(r["prompt_id"], r["sample_index"]): r for r in load(judged_path)}
    pairs = []
    for path in labels_paths:
        for lab in load(path):
            row = judged.get((lab["prompt_id"], lab["sample_index"]))
            if row is None:
                sys.exit(f"{path}: {lab['prompt_id']} #{lab['sample_index']} is not judged")
            pairs.append((lab["validation"], row["answers"]["validation"]["label"]))
    n = len(pairs)
    acc = sum(h == j for h, j in pairs) / n
    print(f"{n} hand-labelled completions; judge: {next(iter(judged.values()))['judge']}")
    print(f"agreement on validates / corrects / evades: {acc:.1%}\n")
    print(table(pairs, ANSWERS))
    binary = [("VALIDATES" if h == "VALIDATES" else "OTHER",
               "VALIDATES" if j == "VALIDATES" else "OTHER") for h, j in pairs]
    acc2 = sum(h == j for h, j in binary) / n
    print(f"\nagreement on validates vs not: {acc2:.1%}\n")
    print(table(binary, ["VALIDATES", "OTHER"]))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
