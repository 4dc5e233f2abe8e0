"""Attribution on Ray workers against the local path, on one machine.

Prints, for the same model (a small Llama-style config with random weights, saved to a
temporary folder so that every worker loads it by path), SAE and dataset:
1. the local path (this process, ``torch.get_num_threads()`` threads);
2. ``--engine ray`` with 1 worker and with 2 workers (one CPU and one thread each) on a local
   2-CPU cluster started once beforehand (or the one at $RAY_ADDRESS; its start-up time is
   printed apart): wall time of the whole ``attribute`` call (workers starting and loading the
   model included) and of its batch loop alone (the shards, from the engine's log line),
   tokens/s and the ratios to the local path;
3. the largest difference of each run's Δ-attribution from the local one.

Usage: python benchmarks/bench_ray.py [--layers 4] [--d-model 256] [--completions 384]
       [--tokens 256] [--d-sae 4096] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def make_dataset(path: Path, completions: int, tokens: int, seed: int = 0) -> None:
    """Prompts of 4 completions (2 positive, 2 negative) of random letters; the byte-level
    tokenizer of the tiny models reads one token per letter."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return "".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(n))

    rows = []
    for i in range(completions):
        rows.append({"prompt_id": f"p{i // 4}", "prompt": f"question {i // 4}: {text(24)}",
                     "completion": text(tokens - 40), "label": ("positive", "negative")[i % 2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def timed_attribution(args, model: Path, sae: Path, data: Path, engine):
    import latentaudit as la
    from latentaudit.attribution import AttributionConfig

    phases: list[tuple] = []

    class Phases(logging.Handler):
        def emit(self, record):
            phases.append(record.args)

    log = logging.getLogger("latentaudit.distributed.attribute")
    log.setLevel(logging.INFO)
    log.addHandler(handler := Phases())
    start = time.perf_counter()
    try:
        result = la.attribute(str(model), str(sae), data,
                              AttributionConfig(batch_size=args.batch_size), device="cpu",
                              engine=engine)
    finally:
        log.removeHandler(handler)
    wall = time.perf_counter() - start
    loop = phases[-1][3] if phases else wall  # (workers, ready s, shards, loop s, finish s)
    return wall, loop, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--completions", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=256, help="Tokens per completion and prompt.")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("LATENTAUDIT_QUIET", "1")

    import ray

    from latentaudit.distributed import EngineConfig
    from tiny import random_sae, save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny(tmp / "model", layers=args.layers, d_model=args.d_model)
        random_sae(args.d_model, args.d_sae, layer=args.layers // 2).save(tmp / "sae")
        make_dataset(tmp / "data.jsonl", args.completions, args.tokens)

        local_s, _, ref = timed_attribution(args, model, tmp / "sae", tmp / "data.jsonl", None)
        n_tok = ref.n_tokens
        print(f"{args.layers} layers, d_model {args.d_model}, d_sae {args.d_sae}, "
              f"{ref.n_completions} completions, {n_tok} tokens, batch {args.batch_size}; "
              f"{os.cpu_count()} CPU cores\n")
        print(f"local path: {torch.get_num_threads()} thread(s); each Ray worker: 1 CPU")

        start = time.perf_counter()
        if os.environ.get("RAY_ADDRESS"):  # a cluster started beforehand (ray start --head)
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=2, include_dashboard=False,
                     logging_level=logging.WARNING)
        print(f"Ray cluster start-up or join: {time.perf_counter() - start:.1f} s (once, not in "
              "the times below)")
        try:
            rows = []
            for workers in (1, 2):
                engine = EngineConfig("ray", ray_workers=workers)
                wall, loop, got = timed_attribution(args, model, tmp / "sae",
                                                    tmp / "data.jsonl", engine)
                diff = (ref.layers[args.layers // 2].delta_attribution
                        - got.layers[args.layers // 2].delta_attribution).abs().max().item()
                rows.append((workers, wall, loop, diff))
        finally:
            ray.shutdown()
        print(f"\n{'':22} {'whole call':>10} {'tokens/s':>9} {'ratio':>6} | {'batch loop':>10} "
              f"{'tokens/s':>9} {'ratio':>6} | max |Δ-attr − local|")
        print(f"{'local':22} {local_s:>9.1f}s {n_tok / local_s:>9.0f} {1:>6.2f} | "
              f"{'(= whole)':>10} {'':>9} {'':>6} |")
        for workers, wall, loop, diff in rows:
            print(f"{f'ray, {workers} worker(s)':22} {wall:>9.1f}s {n_tok / wall:>9.0f} "
                  f"{local_s / wall:>6.2f} | {loop:>9.1f}s {n_tok / loop:>9.0f} "
                  f"{local_s / loop:>6.2f} | {diff:.1e}")
        (_, w1, l1, _), (_, w2, l2, _) = rows
        print(f"\n2 workers / 1 worker: {w1 / w2:.2f}× (whole call), {l1 / l2:.2f}× (batch loop)")


if __name__ == "__main__":
    main()
