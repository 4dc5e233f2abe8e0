"""Peak memory of a whole attribution run against the size of its dataset (it must stay flat).

``latentaudit.attribution.attribute`` (plan, batches, Δ-activation, contraction, ranking) on
synthetic paired completions of a random-weight model (``--config``), with datasets of
``--sizes`` completions. What a run keeps grows with the dataset only by one float per
completion (its loss); the sums are d_model × d_model and d_sae, the batches are a fixed size.
Prints per size the peak memory above the resident model and SAE (CUDA allocator statistics on a
GPU, sampled resident memory on the CPU) and the throughput.

Usage:
  python benchmarks/bench_memory.py --config small --layers 2 --sizes 8 32 128 --seq 32  # CPU
  python benchmarks/bench_memory.py --device cuda --config qwen2.5-1.5b --d-sae 1048576 \
      --sizes 64 256 1024 --batch 16 --seq 256                                     # GPU
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _common import CONFIGS, PeakMemory, StubTokenizer, gib, random_model, random_sae, sync
from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.data.behaviour import Completion
from latentaudit.models.load import parse_dtype, prepare


def dataset(n: int, seq: int, vocab: int) -> list[Completion]:
    """n completions, two per prompt (one positive, one negative), ``seq`` tokens each."""
    g = torch.Generator().manual_seed(n)
    rows = []
    for i in range(n):
        prompt = torch.randint(1, vocab, (seq // 2,), generator=g).tolist()
        comp = torch.randint(1, vocab, (seq // 2 - i % 3,), generator=g).tolist()
        rows.append(Completion(f"p{i // 2}", "", "positive" if i % 2 == 0 else "negative",
                               f"p{i // 2}", prompt_token_ids=prompt, completion_token_ids=comp))
    return rows


def main() -> None:
    os.environ.setdefault("LATENTAUDIT_QUIET", "1")  # no progress bars between the rows
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="Default: bfloat16 on CUDA, else float32.")
    ap.add_argument("--config", default="qwen2.5-0.5b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = random_model(args.config, args.layers, dtype, device)
    loaded = prepare(model, StubTokenizer(), name=f"random-{args.config}")
    D, layer = model.config.hidden_size, model.config.num_hidden_layers // 2
    sae = random_sae(D, args.d_sae, device)
    cfg = AttributionConfig(batch_size=args.batch, top_k=10, checkpoint_every_batches=0,
                            checkpoint_every_seconds=0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {dtype}, {args.config} architecture (random weights), "
          f"{model.config.num_hidden_layers} layers (hook {layer}), d_sae {args.d_sae:,}, "
          f"batches of {args.batch} × {args.seq} tokens, Δ-activation on\n")
    attribute(loaded, {layer: sae}, dataset(args.batch, args.seq, model.config.vocab_size),
              cfg)  # warm-up
    print(f"{'completions':>11} {'tokens':>8} | {'peak above model+SAE':>20} | {'tokens/s':>9}")
    peaks = []
    for n in args.sizes:
        data = dataset(n, args.seq, model.config.vocab_size)
        sync(device)
        start = time.perf_counter()
        with PeakMemory(device) as peak:
            result = attribute(loaded, {layer: sae}, data, cfg)
        sync(device)
        seconds = time.perf_counter() - start
        peaks.append(peak.bytes)
        print(f"{n:>11,} {result.n_tokens:>8,} | {gib(peak.bytes):>20} | "
              f"{result.n_tokens / seconds:>9,.0f}")
    print(f"\npeak at the largest dataset / at the smallest: "
          f"{peaks[-1] / max(peaks[0], 1):.2f} for a {args.sizes[-1] // args.sizes[0]}x larger "
          f"dataset (flat: about 1 or less; the first size also pays one-time allocations)")


if __name__ == "__main__":
    main()
