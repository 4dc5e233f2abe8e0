"""Attribution throughput on the default model's architecture (Qwen2.5-0.5B), random weights.

Prints, for the same batches, in one process:
1. bare forward + backward (the same loss, backward to the hooked activation, nothing else) vs
   latentaudit's attribution without Δ-activation: the throughput ratio (target ≥ 0.9);
2. for d_sae in --d-sae (random SAEs), the SAE-side cost of three routes on the same gradients:
   latentaudit's moment matrix (accumulate Σ g aᵀ per batch, one contraction with the decoder at the
   end), the naive per-token δ (two [tokens × d_sae] matmuls per batch) and the spliced SAE (encode
   through the SAE inside the forward, backward to the latent activations); plus Δ-activation's
   encoder pass, timed separately.

Usage: python benchmarks/bench_attribute.py [--device cuda] [--layers 24] [--batch 8] [--seq 128]
       [--d-sae 4096 65536 1048576]
"""

from __future__ import annotations

import argparse
import time

import torch


def qwen_config(layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def random_sae(d_model, d_sae, device, dtype):
    from latentaudit.saes.sae import SAE, SAEInfo

    W_dec = torch.randn(d_sae, d_model, device=device, dtype=dtype) / d_model**0.5
    return SAE(W_dec.T.contiguous(), torch.zeros(d_sae, device=device, dtype=dtype), W_dec,
               torch.zeros(d_model, device=device, dtype=dtype),
               SAEInfo(activation="topk", k=32), mean_activation=torch.zeros(d_model, device=device,
                                                                              dtype=dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--layers", type=int, default=None, help="Decoder layers (default 24 on "
                    "CUDA, 4 on CPU).")
    ap.add_argument("--layer", type=int, default=None, help="Hooked layer (default: middle).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="Tokens per sequence (half completion).")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--d-sae", type=int, nargs="+", default=[4096, 65536, 1048576])
    ap.add_argument("--project-tokens", type=int, default=100_000,
                    help="Dataset size for the projected whole-run throughput.")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from latentaudit.attribution.accumulate import (
        Accumulators,
        _accumulate,
        _forward_backward,
        _latent_sums,
    )
    from latentaudit.attribution.math import (
        center,
        completion_losses,
        deltas_from_moments,
        token_deltas,
    )
    from latentaudit.data.tokens import collate
    from latentaudit.models.hooks import resid_hooks, run_until
    from latentaudit.models.load import parse_dtype

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    n_layers = args.layers or (24 if device.type == "cuda" else 4)
    layer = args.layer if args.layer is not None else n_layers // 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen_config(n_layers), dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    D = model.config.hidden_size
    half = args.seq // 2
    g = torch.Generator().manual_seed(0)
    batches = [collate([(torch.randint(0, 150000, (half,), generator=g).tolist(),
                         torch.randint(0, 150000, (half - (b % 4),), generator=g).tolist())
                        for b in range(args.batch)], pad_id=0).to(device)
               for _ in range(args.batches)]
    weights = torch.tensor([1.0, -1.0] * (args.batch // 2) + [1.0] * (args.batch % 2),
                           device=device) / args.batch
    positive = weights > 0
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    print(f"device {device}, dtype {dtype}, {n_layers} layers (hook {layer}), d_model {D}, "
          f"{args.batches} batches × {args.batch} × {args.seq} tokens ({n_tok} tokens)")

    def bare():
        for b in batches:
            _forward_backward(model, b, [layer], True)

    def attribution(sae, with_activation=False):
        acc = Accumulators(D, sae.d_sae, device)
        for b in batches:
            _, per = _forward_backward(model, b, [layer], True)
            a, gr = per[layer]
            _accumulate(acc, sae if with_activation else None, a, gr, weights,
                        b.attention_mask.bool(), b, positive)
        M = center(acc.M_raw, acc.g_sum, sae.mean_activation.double())
        return deltas_from_moments(M, sae.decoder_directions())

    t_bare = timed(bare, device, args.repeat)
    sae4k = random_sae(D, 4096, device, torch.float32)
    t_attr = timed(lambda: attribution(sae4k), device, args.repeat)
    print(f"\nbare forward+backward:            {n_tok / t_bare:>10,.0f} tokens/s")
    print(f"attribution (d_sae 4k, no Δ-act): {n_tok / t_attr:>10,.0f} tokens/s   "
          f"ratio {t_bare / t_attr:.3f} (target >= 0.9)")

    cached = []  # the same activations and gradients for every route's SAE-side cost
    for b in batches:
        _, per = _forward_backward(model, b, [layer], True)
        cached.append((b, *per[layer]))
    rows = []
    print(f"\n{'d_sae':>9} | full pipeline tokens/s: {'latentaudit':>11} {'naive':>9} "
          f"{'spliced':>9} | SAE side only (s): {'moments':>8} {'contract':>8} {'naive':>8} "
          f"| Δ-act pass tok/s")
    for d_sae in args.d_sae:
        sae = random_sae(D, d_sae, device, torch.float32)
        dirs = sae.decoder_directions()
        rep = 1 if d_sae > 100_000 else args.repeat

        def moments_only(sae=sae):
            acc = Accumulators(D, sae.d_sae, device)
            for b, a, gr in cached:
                _accumulate(acc, None, a, gr, weights, b.attention_mask.bool(), b, positive)
            return acc

        acc = moments_only()
        M = center(acc.M_raw, acc.g_sum, sae.mean_activation.double())

        def naive_only(sae=sae, dirs=dirs):
            total = torch.zeros(sae.d_sae, device=device)
            for b, a, gr in cached:
                m = b.attention_mask.bool()
                for row in range(a.shape[0]):
                    idx = m[row].nonzero().squeeze(1)
                    for s in range(0, idx.numel(), 256):
                        j = idx[s:s + 256]
                        total += token_deltas(gr[row, j], a[row, j], sae.mean_activation,
                                              dirs).sum(0) * weights[row]
            return total

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

        def activation_pass(sae=sae):
            for b in batches:
                a = run_until(model, [layer], input_ids=b.input_ids,
                              attention_mask=b.attention_mask, position_ids=b.position_ids)[layer]
                comp = b.completion_mask
                _latent_sums(sae, a[comp], positive[:, None].expand_as(comp)[comp])

        t_mom = timed(moments_only, device, rep)
        t_con = timed(lambda M=M, dirs=dirs: deltas_from_moments(M, dirs), device, rep)
        t_nai = timed(naive_only, device, rep)
        try:
            t_spl = timed(spliced, device, rep)
        except torch.OutOfMemoryError:
            t_spl = float("inf")
        t_act = timed(activation_pass, device, rep)
        full = t_bare + t_mom + t_con
        print(f"{d_sae:>9,} | {'':>22} {n_tok / full:>11,.0f} {n_tok / (t_bare + t_nai):>9,.0f} "
              f"{n_tok / t_spl:>9,.0f} | {'':>18} {t_mom:>8.3f} {t_con:>8.3f} {t_nai:>8.3f} "
              f"| {n_tok / t_act:,.0f}")
        rows.append((d_sae, t_mom, t_con, t_nai, t_spl))
        del sae, dirs, M
        if device.type == "cuda":
            torch.cuda.empty_cache()
    N = args.project_tokens
    per_tok_bare = t_bare / n_tok
    print(f"\nprojected whole run over {N:,} tokens (per-token costs above, contraction once):")
    print(f"{'d_sae':>9} | {'latentaudit':>11} {'ratio':>6} | {'naive':>9} {'ratio':>6} | "
          f"{'spliced':>9} {'ratio':>6}   (tokens/s; ratio = throughput / bare fwd+bwd)")
    for d_sae, t_mom, t_con, t_nai, t_spl in rows:
        la = N * (per_tok_bare + t_mom / n_tok) + t_con
        na = N * (per_tok_bare + t_nai / n_tok)
        sp = N * t_spl / n_tok
        bare = N * per_tok_bare
        print(f"{d_sae:>9,} | {N / la:>11,.0f} {bare / la:>6.3f} | {N / na:>9,.0f} "
              f"{bare / na:>6.3f} | {N / sp:>9,.0f} {bare / sp:>6.3f}")
    print("\nlatentaudit = bare fwd+bwd + per-batch moments (independent of d_sae) + one final "
          "contraction; naive = bare + per-token δ; spliced = SAE inside the forward, backward "
          "to the latents.")


if __name__ == "__main__":
    main()
