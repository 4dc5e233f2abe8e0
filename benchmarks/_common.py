"""What the benchmarks share: random-weight models built from a named architecture's config (no
downloads), random SAEs, timing and peak memory."""

from __future__ import annotations

import os
import threading
import time

import torch

CONFIGS = {
    # name: (model_type, hidden, intermediate, layers, heads, kv heads, head dim, vocab, extra)
    "small": ("llama", 256, 688, 4, 4, 2, None, 8192, dict(tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, None, 151936,
                     dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, None, 151936,
                     dict(tie_word_embeddings=True, rope_theta=1e6)),
    "gemma-2-2b": ("gemma2", 2304, 9216, 26, 8, 4, 256, 256000,
                   dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                        query_pre_attn_scalar=256, sliding_window=4096)),
}
"""Architectures by name, from their published configs (the weights here are random); "small"
is a 256-wide Llama-style model for quick runs on a CPU."""


def model_config(name: str, layers: int | None = None):
    """The Hugging Face config of architecture ``name`` (``layers``: fewer decoder layers)."""
    from transformers import AutoConfig

    kind, d, ff, n, heads, kv, head_dim, vocab, extra = CONFIGS[name]
    kw = dict(hidden_size=d, intermediate_size=ff, num_hidden_layers=layers or n,
              num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
              max_position_embeddings=8192, **extra)
    if head_dim:
        kw["head_dim"] = head_dim
    return AutoConfig.for_model(kind, **kw)


def random_model(name: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    """A frozen random-weight causal LM of architecture ``name`` on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = model_config(name, layers)
    if cfg.model_type == "gemma2":
        cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    return model


class StubTokenizer:
    """Enough of a tokenizer for the pipeline on token ids given in the data."""

    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, **kw):
        return "".join(f"<{i}>" for i in ids)


def random_sae(d_model: int, d_sae: int, device, dtype=torch.float32, k: int = 32):
    """A random TopK SAE whose encoder is its decoder's transpose (a view: one copy of the
    weights in memory, so SAEs of a million latents fit next to the model)."""
    from torch import nn

    from latentaudit.saes.sae import SAE, SAEInfo

    g = torch.Generator(device="cpu").manual_seed(d_sae)
    W_dec = (torch.randn(d_sae, d_model, generator=g, dtype=dtype) / d_model**0.5).to(device)
    z = dict(device=device, dtype=dtype)
    sae = SAE(torch.zeros(d_model, 1, **z), torch.zeros(1, **z), torch.zeros(1, d_model, **z),
              torch.zeros(d_model, **z), SAEInfo(activation="topk", k=1),
              mean_activation=torch.zeros(d_model, **z))
    sae.W_dec = nn.Parameter(W_dec, requires_grad=False)
    sae.W_enc = nn.Parameter(W_dec.T, requires_grad=False)
    sae.b_enc = nn.Parameter(torch.zeros(d_sae, **z), requires_grad=False)
    sae.info.k = k
    return sae


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int, warmup: bool = True) -> float:
    """Mean seconds of ``fn()`` over ``repeat`` runs (after one warm-up run)."""
    if warmup:
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block above what was allocated when it started: CUDA's allocator
    statistics on a GPU, the process's resident memory sampled every millisecond on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._peak = _rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, _rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self._thread.join()
        self.bytes = max(self._peak, _rss()) - self.base


def peak_of(fn, device: torch.device) -> int:
    """Peak bytes ``fn()`` allocates above the memory in use when it starts."""
    with PeakMemory(device) as peak:
        fn()
    return peak.bytes


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
