"""Steered generation throughput on a random-weight model of a named architecture (``--config``,
default the default model's, Qwen2.5-0.5B).

Prints, for the same prompts and seeds, in one process:
1. plain batched ``generate`` vs the same batch steered (one vector per row at the middle
   layer): the throughput ratio (target ≥ 0.9);
2. a sweep of C conditions × R rows each: all C·R rows through ``generate`` in batches of
   --batch (rows of many conditions share a batch), vs one ``generate`` call per condition
   (R rows each): completions per second and the ratio.

Usage: python benchmarks/bench_steer.py [--device cuda] [--config qwen2.5-1.5b] [--layers 24]
       [--batch 32] [--conditions 16] [--rows 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from _common import CONFIGS, random_model
    from latentaudit.generate import generate
    from latentaudit.models.hooks import RowSteering
    from latentaudit.models.load import prepare
    from latentaudit.sample import SampleConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="qwen2.5-0.5b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None,
                    help="Decoder layers (default: the architecture's own).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--conditions", type=int, default=16)
    ap.add_argument("--rows", type=int, default=4, help="rows (prompt × sample) per condition")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5, help="alternating runs; medians reported")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.config, args.layers, dtype, device)
    cfg_model = model.config
    model.generation_config.eos_token_id = None

    class Tok:  # enough of a tokenizer for generate(): no EOS, ids decode to nothing
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, **kw):
            return ""

    loaded = prepare(model, Tok(), name=f"random-{args.config}")
    n_layers = cfg_model.num_hidden_layers
    layer, D = n_layers // 2, cfg_model.hidden_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 50000, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    cfg = SampleConfig(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=args.batch)
    seeds = list(range(args.batch))
    vecs = torch.randn(args.batch, D, generator=g) * 5

    def run(steer):
        start = time.perf_counter()
        generate(loaded, prompts, seeds, cfg, steering=RowSteering(layer, vecs) if steer else None)
        sync(device)
        return time.perf_counter() - start

    run(False)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.repeat):  # alternate, so a slow spell of the machine hits both
        for steer in (False, True):
            times[steer].append(run(steer))
    plain, steered = (sorted(times[s])[len(times[s]) // 2] for s in (False, True))  # medians
    tokens = args.batch * args.new_tokens
    print(f"device {device}, dtype {dtype}, {args.config}, {n_layers} layers (steer at {layer}), "
          f"batch {args.batch} × {args.prompt_len} prompt + {args.new_tokens} new tokens\n")
    print(f"plain generate:            {tokens / plain:8.1f} new tokens/s")
    print(f"steered (a vector a row):  {tokens / steered:8.1f} new tokens/s   ratio "
          f"{plain / steered:.3f} (target >= 0.9)")

    C, R = args.conditions, args.rows
    rows = [(c, r) for c in range(C) for r in range(R)]
    cvecs = torch.randn(C, D, generator=g) * 5

    def batched():
        for s in range(0, len(rows), args.batch):
            part = rows[s:s + args.batch]
            generate(loaded, [prompts[r % len(prompts)] for _, r in part], [r for _, r in part],
                     cfg, steering=RowSteering(layer, cvecs[[c for c, _ in part]]))

    def per_condition():
        for c in range(C):
            generate(loaded, [prompts[r % len(prompts)] for r in range(R)], list(range(R)), cfg,
                     steering=RowSteering(layer, cvecs[c].expand(R, -1)))

    timings = {}
    for name, fn in (("many conditions per call", batched),
                     ("one condition per call", per_condition)):
        start = time.perf_counter()
        fn()
        sync(device)
        timings[name] = time.perf_counter() - start
    print(f"\nsweep of {C} conditions × {R} rows ({C * R} completions):")
    for name, t in timings.items():
        print(f"{name + ':':<27}{C * R / t:8.2f} completions/s")
    ratio = timings["one condition per call"] / timings["many conditions per call"]
    print(f"ratio (many / one per call): {ratio:.2f}")


if __name__ == "__main__":
    main()
