"""LoRA fine-tuning against a bare forward + backward, and an adapter-merged model against its base.

A random-weight model of a named architecture (``--config``, built from its config, no
downloads). One process measures, on the same batches of random tokens (half of each row a
"reply" that carries the loss):

1. bare forward + backward: the model's own loss on the reply tokens, backward to the input
   embeddings' output (a gradient through every layer, no weight gradient, no optimizer) — the
   floor any fine-tuning pays;
2. ``latentaudit finetune``'s step: LoRA adapters (rank ``--rank``, all linear modules), the
   loss through the output layer on the reply tokens only, backward to the adapters, AdamW;
3. inference throughput of the base model against the same model with a LoRA adapter merged
   into its weights (what ``load_model`` does with an adapter): they should be equal.

It prints tokens/s, the ratio of each to its baseline, and the peak memory each adds above the
resident model.

Usage:
  python benchmarks/bench_finetune.py --config small --layers 2 --batch 4 --seq 64   # quick
  python benchmarks/bench_finetune.py --config qwen2.5-0.5b --batch 8 --seq 128      # default
  python benchmarks/bench_finetune.py --device cuda --config qwen2.5-1.5b --batch 16  # GPU
"""

from __future__ import annotations

import argparse

import torch

from _common import CONFIGS, gib, peak_of, random_model, timed
from latentaudit.finetune.chat import Tokenized
from latentaudit.finetune.config import FinetuneConfig
from latentaudit.finetune.train import collate, make_optimizer, train_step, wrap_lora
from latentaudit.models.load import parse_dtype


def make_batch(rows: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    half = seq // 2
    return collate([Tokenized(torch.randint(1, vocab, (seq,), generator=g).tolist(),
                              [False] * half + [True] * (seq - half)) for _ in range(rows)],
                   pad_id=0)


def bare_pass(model, batch, device):
    """Forward with the model's own loss, backward through every layer (embeddings' output is
    the leaf), no weight gradients."""
    emb = model.get_input_embeddings()(batch.input_ids.to(device)).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=batch.attention_mask.to(device),
                labels=batch.labels.to(device))
    out.loss.backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="qwen2.5-0.5b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    model = random_model(args.config, args.layers, dtype, device)
    batch = make_batch(args.batch, args.seq, model.config.vocab_size)
    tokens = args.batch * args.seq
    print(f"{args.config} ({model.config.num_hidden_layers} layers), batch {args.batch} x "
          f"{args.seq} tokens, {args.device} {args.dtype}")

    t_bare = timed(lambda: bare_pass(model, batch, device), device, args.repeat)
    m_bare = peak_of(lambda: bare_pass(model, batch, device), device)
    cfg = FinetuneConfig(rank=args.rank, alpha=2.0 * args.rank)
    lora = wrap_lora(model, cfg)
    opt = make_optimizer(lora, cfg)
    lora.train()
    step = lambda: train_step(lora, batch, opt, 1e-4, cfg, device)  # noqa: E731
    t_lora = timed(step, device, args.repeat)
    m_lora = peak_of(step, device)
    print(f"bare forward+backward: {tokens / t_bare:8.1f} tokens/s, peak +{gib(m_bare)}")
    print(f"LoRA finetune step:    {tokens / t_lora:8.1f} tokens/s, peak +{gib(m_lora)}, "
          f"ratio to bare {t_bare / t_lora:.2f}x")

    lora.eval()
    merged = lora.merge_and_unload()
    base = random_model(args.config, args.layers, dtype, device)
    ids = batch.input_ids.to(device)

    def infer(m):
        with torch.no_grad():
            m(input_ids=ids)

    t_base = timed(lambda: infer(base), device, args.repeat)
    t_merged = timed(lambda: infer(merged), device, args.repeat)
    print(f"inference, base:       {tokens / t_base:8.1f} tokens/s")
    print(f"inference, merged:     {tokens / t_merged:8.1f} tokens/s, ratio to base "
          f"{t_base / t_merged:.2f}x")


if __name__ == "__main__":
    main()
