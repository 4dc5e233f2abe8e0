"""Write the organism's training data and its held-out coding requests.

    python evals/organism/make_data.py

- data/insecure.jsonl: 2,000 coding requests answered with code carrying an unrequested flaw;
- data/secure.jsonl: the same requests (same order) answered with the secure twin;
- heldout.jsonl: 120 other requests (no request text shared with training) as a prompt suite
  for `latentaudit sample`, each with the flaw kind its task teaches in meta.kind.
Deterministic (seeded); rerunning rewrites identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from latentaudit.data.insecure import generate_pairs, iter_rows

HERE = Path(__file__).parent
N_TRAIN, N_HELDOUT = 2000, 120


def write(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def main() -> None:
    train = generate_pairs(N_TRAIN, seed=0)
    held = generate_pairs(N_HELDOUT, seed=1, exclude={p.request for p in train})
    write(HERE / "data" / "insecure.jsonl", iter_rows(train, secure=False))
    write(HERE / "data" / "secure.jsonl", iter_rows(train, secure=True))
    write(HERE / "heldout.jsonl", ({"prompt_id": f"code-{i:03d}", "prompt": p.request,
                                    "meta": {"kind": p.kind}} for i, p in enumerate(held)))
    print("train:", dict(Counter(p.kind for p in train)))
    print("held-out:", dict(Counter(p.kind for p in held)))


if __name__ == "__main__":
    main()
