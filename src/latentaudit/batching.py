"""Batch sizes that fit the device: chosen from free memory, halved on out-of-memory.

Every stage that batches rows through the model (attribution, sampling and steered generation,
the explain scans) goes through this module.

1. Estimate (:func:`row_bytes`): the device memory one row of a pass needs, from the model's
   config: the activations a forward keeps for its backward above the hooked layer, the KV cache
   of a generation, the logits (float32) and the sampler's working copies. An estimate, not a
   measurement: step 3 catches what it misses.
2. Choose (:func:`auto_batch_size`): ``free × HEADROOM / row_bytes`` rows, with the free memory
   from ``torch.cuda.mem_get_info``; on a device that cannot report it (cpu, mps) the caller's
   fallback. A batch size of 0 in a stage's config asks for this (``--batch-size auto``).
3. Guard (:class:`BatchGuard`): a batch runs as consecutive slices of at most ``limit`` rows;
   when one raises ``torch.OutOfMemoryError`` the cache is emptied, the limit halved and that
   slice retried, down to one row. The slice function must change nothing before it returns
   (its caller merges the returned results in order), so a retried slice is neither lost nor
   counted twice, and the merged result is that of the unsplit batch. The new limit is logged
   once and kept for the rest of the process (one guard per model and stage,
   :func:`guard_for`).
4. Release (:func:`release_memory`): between the stages of a run, the memory a finished stage
   freed goes back to the device and to the operating system (the allocator's caches and, with
   glibc, the heap's free pages), so the next stage starts from the model's own footprint and
   a run's peak is that of its largest stage, not the sum of what each one left behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from latentaudit.errors import LatentAuditError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

HEADROOM = 0.7
"""Share of the free device memory an automatic batch may plan to use."""
MAX_AUTO_BATCH = 512
"""Most rows an automatic batch size chooses."""
KINDS = ("backward", "forward", "generate")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a causal LM that set its memory per token."""

    layers: int
    d_model: int
    d_ff: int
    vocab: int
    kv_dim: int
    """Key (or value) width per token and layer: key-value heads × head dim."""
    elem: int
    """Bytes per activation element (the model's dtype)."""


def model_shape(model: nn.Module) -> ModelShape:
    """The :class:`ModelShape` of a Hugging Face causal LM, read from its (text) config."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first(*names: str, default: int = 0) -> int:
        return next((int(v) for n in names if isinstance(v := getattr(cfg, n, None), int)),
                    default)

    d = first("hidden_size", "n_embd")
    heads = first("num_attention_heads", "n_head", default=1)
    head_dim = first("head_dim", default=d // max(heads, 1))
    kv_heads = first("num_key_value_heads", default=heads)
    elem = next(model.parameters()).element_size()
    return ModelShape(layers=first("num_hidden_layers", "n_layer", "num_layers"), d_model=d,
                      d_ff=first("intermediate_size", "n_inner", default=4 * d) or 4 * d,
                      vocab=first("vocab_size"), kv_dim=kv_heads * head_dim, elem=elem)


def row_bytes(shape: ModelShape, kind: str, tokens: int, *, layers: int | None = None,
              logit_tokens: int = 1) -> int:
    """Device bytes one row of ``tokens`` positions needs in a pass of ``kind`` (step 1).

    backward: forward + backward of the ``layers`` decoder layers above the hook (default all):
    each keeps ~8 d_model + 3 d_ff activations per token for its backward; logits, their
    log-softmax and gradient in float32 at ``logit_tokens`` positions. forward: a forward without
    gradients up to a layer: one layer's working set at a time. generate: the KV cache of every
    layer for ``tokens`` positions, the prefill's working set, and the sampler's float64 copies
    of one row of logits.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    s = shape
    n_layers = s.layers if layers is None else layers
    working = (4 * s.d_model + 2 * s.d_ff) * s.elem * tokens  # one layer's live tensors
    if kind == "backward":
        kept = n_layers * (8 * s.d_model + 3 * s.d_ff) * s.elem * tokens
        return kept + working + 3 * 4 * s.vocab * logit_tokens
    if kind == "forward":
        return 2 * working + 4 * s.vocab * logit_tokens
    cache = 2 * s.layers * s.kv_dim * s.elem * tokens
    return cache + working + 6 * 8 * s.vocab


def free_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device`` (CUDA only; None where it cannot be asked)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def auto_batch_size(device: torch.device | str, bytes_per_row: int, fallback: int,
                    what: str = "batch") -> int:
    """Rows per batch from free device memory (step 2); ``fallback`` where it is unknown."""
    free = free_memory(device)
    if free is None:
        return fallback
    rows = int(free * HEADROOM) // max(1, bytes_per_row)
    size = max(1, min(MAX_AUTO_BATCH, rows))
    log.info("%s: batch size %d from %.1f GiB free on %s (~%.1f MiB per row)", what, size,
             free / 2**30, device, bytes_per_row / 2**20)
    return size


class BatchGuard:
    """Runs a batch in slices of at most ``limit`` rows, halving it on out-of-memory (step 3)."""

    def __init__(self, what: str, limit: int | None = None) -> None:
        self.what = what
        self.limit = limit
        """Largest slice known to fit (None: the whole batch is tried first)."""
        self._logged = False

    def run(self, items: Sequence[T], fn: Callable[[Sequence[T]], R]) -> list[R]:
        """``fn`` over consecutive slices covering ``items`` in order; their results in order.

        ``fn`` must have no side effect before it returns: a slice that runs out of memory is
        retried as two halves.
        """
        out: list[R] = []
        start = 0
        while start < len(items):
            size = min(len(items) - start, self.limit or len(items))
            oom = False
            try:
                out.append(fn(items[start:start + size]))
            except torch.OutOfMemoryError:
                oom = True  # handled outside the except block, so its frames are freed first
            if not oom:
                start += size
                continue
            if size == 1:
                raise LatentAuditError(
                    f"{self.what}: one row does not fit in device memory; use a smaller model "
                    "dtype (--dtype bfloat16), shorter sequences, or spread the model over "
                    "several GPUs (--device auto-map).")
            self._shrink(size // 2)
        return out

    def _shrink(self, size: int) -> None:
        self.limit = size
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self._logged:
            log.warning("%s: out of device memory; batches now run in slices of at most %d "
                        "rows (results are unchanged)", self.what, size)
            self._logged = True
        else:
            log.debug("%s: slices of at most %d rows", self.what, size)


_GUARDS: weakref.WeakKeyDictionary[nn.Module, dict[str, BatchGuard]] = \
    weakref.WeakKeyDictionary()


def guard_for(model: nn.Module, what: str) -> BatchGuard:
    """The one :class:`BatchGuard` of ``model`` for the stage ``what`` (its limit persists)."""
    per_model = _GUARDS.setdefault(model, {})
    if what not in per_model:
        per_model[what] = BatchGuard(what)
    return per_model[what]


def resolve_batch_size(value: int, model: nn.Module, device: torch.device | str, kind: str,
                       tokens: int, fallback: int, what: str, **kw) -> int:
    """``value`` itself, or (when 0) the automatic batch size for rows of ``tokens`` tokens."""
    if value:
        return value
    return auto_batch_size(device, row_bytes(model_shape(model), kind, tokens, **kw), fallback,
                           what)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (looked up once: ``find_library`` runs a subprocess), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Step 4 of the module docstring: collect garbage, empty the CUDA cache and return the
    heap's free pages to the system. True when the heap was trimmed (glibc only)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
