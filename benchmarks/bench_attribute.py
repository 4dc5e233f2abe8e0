"""Attribution against a bare forward + backward and against the spliced-SAE way, per d_sae.

A random-weight model of a named architecture (``--config``, built from its config, no
downloads), hooked at its middle layer, and random TopK SAEs of each ``--d-sae``. One process
measures, on the same batches:

1. bare forward + backward: the same completion loss, backward to the hooked activation, nothing
   else (the floor any gradient method pays);
2. latentaudit's attribution: the same pass plus the per-batch moments Σ w g aᵀ (d_model ×
   d_model, independent of d_sae) and, once per run, the contraction −d_iᵀ M d_i with the
   decoder (streamed in chunks);
3. the spliced-SAE way: the SAE encodes inside the forward (the latents are leaves that need
   their gradient), the backward runs to the latents, attribution = −Σ_t g_f · f.

Per d_sae it prints throughput (tokens/s) and the ratio to the bare pass, measured on the
benchmark's tokens and projected to ``--project-tokens`` (the contraction is paid once per run,
so on few tokens it dominates), and the peak memory each route adds above the resident model
and SAE (CUDA allocator statistics on a GPU, sampled resident memory on the CPU).

Usage:
  python benchmarks/bench_attribute.py --config small --layers 2 --batch 2 --seq 32  # CPU
  python benchmarks/bench_attribute.py --device cuda --config qwen2.5-1.5b          # GPU
"""

from __future__ import annotations

import argparse

import torch

from _common import CONFIGS, gib, peak_of, random_model, random_sae, timed
from latentaudit.attribution.accumulate import Accumulators, forward_backward, layer_sums
from latentaudit.attribution.finish import contract
from latentaudit.attribution.math import center, completion_losses
from latentaudit.data.tokens import collate
from latentaudit.models.hooks import resid_hooks
from latentaudit.models.load import parse_dtype


def qwen_config(layers: int):
    """The default model's architecture (Qwen2.5-0.5B) with ``layers`` decoder layers."""
    from _common import model_config

    return model_config("qwen2.5-0.5b", layers)


def make_batches(n: int, rows: int, seq: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    half = seq // 2
    return [collate([(torch.randint(0, vocab, (half,), generator=g).tolist(),
                      torch.randint(0, vocab, (half - (b % 4),), generator=g).tolist())
                     for b in range(rows)], pad_id=0).to(device) for _ in range(n)]


def less(other: float, ours: float) -> str:
    """How many times less memory ours takes ("-" below the 1 MiB the CPU sampling resolves)."""
    return "-" if ours < 2**20 else f"{other / ours:.1f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="Default: bfloat16 on CUDA, else float32.")
    ap.add_argument("--config", default="qwen2.5-0.5b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None,
                    help="Decoder layers (default: the architecture's own).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="Tokens per sequence (half completion).")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--d-sae", type=int, nargs="+", default=[16384, 131072, 1048576])
    ap.add_argument("--project-tokens", type=int, default=1_000_000,
                    help="Dataset size for the projected whole-run throughput.")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = random_model(args.config, args.layers, dtype, device)
    n_layers, D = model.config.num_hidden_layers, model.config.hidden_size
    layer = n_layers // 2
    batches = make_batches(args.batches, args.batch, args.seq, model.config.vocab_size, device)
    weights = torch.tensor([1.0, -1.0] * (args.batch // 2) + [1.0] * (args.batch % 2),
                           device=device) / args.batch
    positive = weights > 0
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {dtype}, {args.config} architecture (random weights), "
          f"{n_layers} layers (hook {layer}), d_model {D}, {args.batches} batches × "
          f"{args.batch} × {args.seq} tokens ({n_tok} tokens)")

    def bare():
        for b in batches:
            forward_backward(model, b, [layer], True)

    def moments():
        acc = Accumulators(D, 1, device)
        for b in batches:
            _, per = forward_backward(model, b, [layer], True)
            a, g = per[layer]
            acc.add(layer_sums(None, a, g, weights, b.attention_mask.bool(), b, positive))
        return acc

    t_bare = timed(bare, device, args.repeat)
    t_mom = timed(moments, device, args.repeat)
    m_bare = peak_of(bare, device)
    m_mom = peak_of(moments, device)
    acc = moments()
    M = center(acc.M_raw, acc.g_sum, torch.zeros(D, dtype=torch.float64, device=device))
    print(f"\nbare forward+backward:      {n_tok / t_bare:>10,.0f} tokens/s   peak +{gib(m_bare)}")
    print(f"forward+backward+moments:   {n_tok / t_mom:>10,.0f} tokens/s   peak +{gib(m_mom)}   "
          f"ratio {t_bare / t_mom:.3f} (target >= 0.9; independent of d_sae)")

    print(f"\nmeasured on {n_tok:,} tokens (latentaudit = fwd+bwd+moments + one contraction):")
    print(f"{'d_sae':>9} | {'latentaudit':>11} {'ratio':>6} | {'spliced':>9} {'ratio':>6} | "
          f"{'contract s':>10} | peak above model+SAE: {'latentaudit':>11} {'spliced':>10} "
          f"{'less':>6}", flush=True)
    rows = []
    for d_sae in args.d_sae:
        sae = random_sae(D, d_sae, device)
        rep = 1 if d_sae > 200_000 and device.type == "cpu" else args.repeat
        t_con = timed(lambda sae=sae: contract(M, sae), device, rep)
        m_con = peak_of(lambda sae=sae: contract(M, sae), device)

        def spliced(sae=sae):
            total = torch.zeros(sae.d_sae, device=device)
            for b in batches:
                store = {}

                def splice(h, store=store):
                    f = sae.encode(h.float()).detach().requires_grad_(True)  # (B, T, S)
                    store["f"] = f
                    err = (h.float() - sae.decode(f)).detach()
                    return (sae.decode(f) + err).to(h.dtype)

                k = b.n_completion
                with resid_hooks(model, {layer: splice}):
                    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                   position_ids=b.position_ids, logits_to_keep=k + 1,
                                   use_cache=False).logits[:, -(k + 1):-1]
                loss = completion_losses(logits, b.input_ids[:, -k:], b.completion_mask[:, -k:])
                (gf,) = torch.autograd.grad((loss * weights).sum(), store["f"])
                total += -(gf * store["f"].detach()).sum((0, 1))
            return total

        try:
            t_spl = timed(spliced, device, rep, warmup=rep > 1)
            m_spl = peak_of(spliced, device)
        except torch.OutOfMemoryError:
            t_spl, m_spl = float("inf"), float("nan")
        rows.append((d_sae, t_con, m_con, t_spl, m_spl))
        la = t_mom + t_con
        m_la = max(m_mom, m_con)
        print(f"{d_sae:>9,} | {n_tok / la:>11,.0f} {t_bare / la:>6.3f} | {n_tok / t_spl:>9,.1f} "
              f"{t_bare / t_spl:>6.3f} | {t_con:>10.3f} | {'':>21} {gib(m_la):>11} "
              f"{gib(m_spl):>10} {less(m_spl, m_la):>6}", flush=True)
        del sae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    N = args.project_tokens
    print(f"\nprojected to a run of {N:,} tokens (per-token costs above, contraction once):")
    print(f"{'d_sae':>9} | {'latentaudit':>11} {'ratio':>6} | {'spliced':>9} {'ratio':>6} | "
          f"{'latentaudit/spliced':>19}")
    for d_sae, t_con, _, t_spl, _ in rows:
        la = N * t_mom / n_tok + t_con
        sp = N * t_spl / n_tok
        bare_t = N * t_bare / n_tok
        print(f"{d_sae:>9,} | {N / la:>11,.0f} {bare_t / la:>6.3f} | {N / sp:>9,.1f} "
              f"{bare_t / sp:>6.3f} | {sp / la:>18.1f}x")
    print("\nratio = throughput / bare forward+backward. Peak memory: what each route allocates "
          "above the resident model and SAE weights.")


if __name__ == "__main__":
    main()
