"""Attribution on Ray workers: completions sharded, float64 moment sums added by the driver.

The sums of :mod:`latentaudit.attribution.accumulate` (M_raw = Σ_C w_C Σ_t g_t a_tᵀ, s = Σ w g,
the activation and latent sums, the token counts, ℓ_C) are plain sums over batches, so a shard
of batches can be summed anywhere and the shards added afterwards:

1. One worker checks that the SAEs fit the model and plans the batches, exactly as the local
   path does (:func:`~latentaudit.attribution.engine.prepare_plan`); the plan is deterministic.
2. The batches are cut into shards of contiguous batches (about four per worker, at most
   ``checkpoint_every_batches`` each). Shards already in the checkpoint folder with this run's
   key (:func:`~latentaudit.attribution.accumulate.run_key`) are skipped.
3. Each worker runs the local batch loop on its shard and returns its float64 sums; the driver
   saves each finished shard atomically as ``batches-START-END.safetensors`` in the folder, so a
   lost worker loses only the shard in flight, and adds the shards in batch order.
4. One worker finishes from the total exactly as the local path does (ā, the contraction
   Δ-attribution_i = −d_iᵀ M d_i, Δ-activation, the ranking and its logit lens).

The result equals the single-process one up to the order in which float64 partial sums are
added (shards in batch order, batches within a shard in order); a single shard is bit-for-bit
the local loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

from torch import Tensor

from latentaudit._io import save_safetensors
from latentaudit.attribution.accumulate import Accumulators, Sums, run_batches, run_key
from latentaudit.attribution.config import AttributionConfig, AttributionResult
from latentaudit.attribution.engine import prepare_plan
from latentaudit.attribution.finish import finish
from latentaudit.attribution.plan import Inputs
from latentaudit.distributed.pool import WorkerPool
from latentaudit.executor import EngineConfig

log = logging.getLogger(__name__)

Range = tuple[int, int]
"""Batches [start, end) of the plan."""


def attribute_ray(model: str, inputs: Inputs, cfg: AttributionConfig, engine: EngineConfig, *,
                  checkpoint: str | os.PathLike | None = None, device: str = "auto",
                  dtype: str = "float32") -> AttributionResult:
    """Attribute on Ray workers (steps 1–4 of the module docstring); ``checkpoint`` is the
    folder of finished shards (None: keep nothing)."""
    folder = Path(checkpoint) if checkpoint else None
    start = time.perf_counter()
    with WorkerPool(engine, device=device, dtype=dtype) as pool:
        plan, key = pool.call(_plan, model, inputs, cfg)
        ready = time.perf_counter()
        n_batches = len(plan.batches)
        done = read_shards(folder, key) if folder else {}
        per = shard_size(n_batches, pool.n_workers, cfg.checkpoint_every_batches)
        todo = split_ranges(missing_ranges(n_batches, list(done)), per)
        total = ShardSum(sorted([*done, *todo]), done)
        if done:
            log.info("resuming attribution: %d of %d batches already in %s",
                     sum(e - s for s, e in done), n_batches, folder)

        def keep(i: int, state: dict[str, Tensor]) -> None:
            if folder:
                save_shard(folder, key, todo[i], state)
            total.add(todo[i], state)

        shared = pool.share((model, inputs, plan, cfg))
        pool.run(_shard, todo, shared=shared, on_result=keep, sizes=[e - s for s, e in todo],
                 desc="attribute", unit="batch", initial=n_batches - sum(e - s for s, e in todo))
        loop = time.perf_counter()
        result = pool.call(_finish, total.result(), shared=shared)
    log.info("Ray attribution on %d worker(s): start and plan %.1f s, %d shard(s) %.1f s, "
             "finish %.1f s", pool.n_workers, ready - start, len(todo), loop - ready,
             time.perf_counter() - loop)
    return result


# ---- on the workers ---------------------------------------------------------------------------

def _plan(worker, _, model: str, inputs: Inputs, cfg: AttributionConfig):
    loaded = worker.model(model)
    plan = prepare_plan(loaded, inputs, cfg)
    return plan, run_key(loaded, inputs.saes, plan, cfg)


def _shard(worker, shared, start: int, end: int) -> dict[str, Tensor]:
    model, inputs, plan, cfg = shared
    loaded = worker.model(model)
    if "saes" not in worker.memo:
        worker.memo["saes"] = {L: sae.to(loaded.device) for L, sae in inputs.saes.items()}
    part = dataclasses.replace(plan, batches=plan.batches[start:end])
    sums = run_batches(loaded, worker.memo["saes"], part, cfg)
    return sums_state(sums)


def _finish(worker, shared, state: dict[str, Tensor]) -> AttributionResult:
    model, inputs, plan, cfg = shared
    loaded = worker.model(model)
    return finish(loaded, inputs, plan, state_sums(state, inputs), cfg)


# ---- shards: their ranges, files and sum -------------------------------------------------------

def sums_state(sums: Sums) -> dict[str, Tensor]:
    """The loop's sums as named CPU tensors (``losses`` and ``<name>.<layer>``)."""
    state = {"losses": sums.losses.cpu()}
    for L, acc in sums.acc.items():
        state.update({k: v.cpu() for k, v in acc.state(L).items()})
    return state


def state_sums(state: dict[str, Tensor], inputs: Inputs) -> Sums:
    """:func:`sums_state` inverted (accumulators on the CPU)."""
    acc = {}
    for L, sae in inputs.saes.items():
        acc[L] = Accumulators(state[f"M_raw.{L}"].shape[0], sae.d_sae, "cpu")
        acc[L].load(L, state)
    return Sums(acc, state["losses"])


def shard_size(n_batches: int, workers: int, cap: int) -> int:
    """Batches per shard: about four shards per worker, at most ``cap`` (0: no cap)."""
    per = max(1, math.ceil(n_batches / (4 * workers)))
    return min(per, cap) if cap else per


def missing_ranges(n_batches: int, done: list[Range]) -> list[Range]:
    """The ranges of [0, n_batches) not covered by ``done`` (disjoint ranges)."""
    out, at = [], 0
    for s, e in sorted(done):
        if s > at:
            out.append((at, s))
        at = max(at, e)
    if at < n_batches:
        out.append((at, n_batches))
    return out


def split_ranges(ranges: list[Range], per: int) -> list[Range]:
    """Each range cut into pieces of at most ``per`` batches."""
    return [(s, min(s + per, e)) for a, e in ranges for s in range(a, e, per)]


def shard_path(folder: Path, r: Range) -> Path:
    return folder / f"batches-{r[0]:06d}-{r[1]:06d}.safetensors"


def save_shard(folder: Path, key: str, r: Range, state: dict[str, Tensor]) -> None:
    save_safetensors(shard_path(folder, r), state,
                     metadata={"key": key, "start": str(r[0]), "end": str(r[1])})


def read_shards(folder: Path, key: str) -> dict[Range, Path]:
    """The finished shards in ``folder`` that belong to this run (by key), without overlaps."""
    from safetensors import safe_open

    found: dict[Range, Path] = {}
    for path in sorted(folder.glob("batches-*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # a file cut short by a kill: its shard is simply redone
            log.info("ignoring unreadable shard %s", path)
            continue
        if meta.get("key") != key:
            log.info("ignoring shard %s: it belongs to a different run", path)
            continue
        r = (int(meta["start"]), int(meta["end"]))
        if all(r[1] <= s or e <= r[0] for s, e in found):
            found[r] = path
    return found


class ShardSum:
    """Adds shard sums in batch order whatever order they finish in (so the result does not
    depend on the workers' timing); shards read from files are loaded when their turn comes."""

    def __init__(self, order: list[Range], files: dict[Range, Path]) -> None:
        self.order, self.files = order, files
        self.waiting: dict[Range, dict[str, Tensor]] = {}
        self.total: dict[str, Tensor] | None = None
        self.next = 0
        self._drain()

    def add(self, r: Range, state: dict[str, Tensor]) -> None:
        self.waiting[r] = state
        self._drain()

    def _drain(self) -> None:
        from safetensors.torch import load_file

        while self.next < len(self.order):
            r = self.order[self.next]
            if r in self.waiting:
                state = self.waiting.pop(r)
            elif r in self.files:
                state = load_file(str(self.files[r]))
            else:
                return
            self.total = state if self.total is None else \
                {k: v + state[k] for k, v in self.total.items()}
            self.next += 1

    def result(self) -> dict[str, Tensor]:
        if self.total is None or self.next < len(self.order):
            raise RuntimeError("ShardSum.result() before every shard was added")
        return self.total
