"""The top-activating-examples scan of ``explain`` on Ray workers: parts of the corpus as tasks.

1. The driver reads the example cache as the local pass does (:mod:`latentaudit.explain.examples`):
   a finished pass is read back; an unfinished one resumes after its ``sequences_done``.
2. It packs the rest of the corpus into token sequences (the same ones, in the same order) and
   cuts them into parts of whole batches, about four per worker. A worker runs the local pass on
   its part (its sequence numbers are the corpus's), from an empty state, and returns the part's
   top-k with windows, its firing counts and histogram, and its token count.
3. The driver merges the parts in corpus order (:func:`~latentaudit.explain.topk.merge_states`,
   counts added) and saves the merged prefix to the cache in the local pass's format every
   ``checkpoint_seconds``, so a killed run (or worker) loses only parts in flight or waiting for
   an earlier one, and either engine resumes it. The result is exactly what one pass keeps:
   equal activations go to the earlier place in the corpus either way.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
from time import monotonic

from latentaudit.distributed.pool import WorkerPool
from latentaudit.explain.config import ExplainConfig
from latentaudit.explain.examples import (
    CorpusExamples,
    cache_path,
    corpus_sequences,
    merge_batch,
    n_sequences,
    read_cache,
    save_cache,
)
from latentaudit.explain.topk import (
    Density,
    TopK,
    add_density,
    empty_density,
    empty_topk,
    merge_states,
)
from latentaudit.models.forward import pad_id
from latentaudit.saes.harvest import pad_batch
from latentaudit.saes.sae import SAE

log = logging.getLogger(__name__)


def corpus_examples_ray(pool: WorkerPool, loaded, sae: SAE, layer: int, cfg: ExplainConfig,
                        key: str, cache_dir: str | os.PathLike | None = None,
                        checkpoint_seconds: float = 120.0) -> CorpusExamples:
    """:func:`~latentaudit.explain.examples.corpus_examples` with the pass on ``pool``."""
    path = cache_path(key, cache_dir)
    got = read_cache(path, key)
    if got is not None and got.complete:
        log.info("top-activating examples of layer %d read from the cache %s", layer, path)
        return CorpusExamples(got.top, got.density, got.tokens, got.done, key, path)
    if got is None:
        top = empty_topk(sae.d_sae, cfg.examples, cfg.context_before, cfg.context_after)
        density, tokens, done = empty_density(sae.d_sae), 0, 0
    else:
        top, density, tokens, done = got.top, got.density, got.tokens, got.done
        log.info("resuming the corpus pass of layer %d after %d sequences", layer, done)
    seqs = list(itertools.islice(corpus_sequences(cfg, loaded.tokenizer), done, None))
    step = cfg.batch_size * max(1, math.ceil(len(seqs) / (4 * pool.n_workers * cfg.batch_size)))
    parts = [(done + k, seqs[k:k + step]) for k in range(0, len(seqs), step)]
    pad = pad_id(loaded.tokenizer)
    waiting: dict[int, tuple] = {}
    state = {"top": top, "density": density, "tokens": tokens, "done": done, "saved": monotonic()}

    def merge(i: int, result: tuple) -> None:
        waiting[parts[i][0]] = (result, len(parts[i][1]))
        while state["done"] in waiting:
            (part_top, part_density, part_tokens), n = waiting.pop(state["done"])
            state["top"] = merge_states(state["top"], part_top)
            state["density"] = add_density(state["density"], part_density)
            state["tokens"] += part_tokens
            state["done"] += n
        if checkpoint_seconds and monotonic() - state["saved"] >= checkpoint_seconds:
            save_cache(path, key, state["top"], state["density"], state["tokens"], state["done"],
                  complete=False)
            state["saved"] = monotonic()

    cpu_sae = sae if sae.W_dec.device.type == "cpu" else copy.deepcopy(sae).cpu()
    shared = pool.share((loaded.name, cpu_sae, layer, cfg, pad))
    pool.run(_scan, parts, shared=shared, on_result=merge, sizes=[len(p) for _, p in parts],
             desc=f"top examples L{layer}", unit="seq", initial=done)
    save_cache(path, key, state["top"], state["density"], state["tokens"], state["done"],
               complete=True)
    if state["done"] != n_sequences(cfg):
        log.info("the corpus held %d of the %d sequences asked for", state["done"],
                 n_sequences(cfg))
    return CorpusExamples(state["top"], state["density"], state["tokens"], state["done"], key,
                          path)


def _scan(worker, shared, first: int, seqs: list[list[int]]) -> tuple[TopK, Density, int]:
    name, sae, layer, cfg, pad = shared
    loaded = worker.model(name)
    if "sae" not in worker.memo:
        worker.memo["sae"] = sae.to(loaded.device)
    sae, dev = worker.memo["sae"], loaded.device
    top = empty_topk(sae.d_sae, cfg.examples, cfg.context_before, cfg.context_after, dev)
    density, tokens = empty_density(sae.d_sae, dev), 0
    for b in range(0, len(seqs), cfg.batch_size):
        ids, mask = (t.to(dev) for t in pad_batch(seqs[b:b + cfg.batch_size], pad))
        top, density, n = merge_batch(loaded.model, sae, layer, ids, mask, first + b, top,
                                       density, cfg)
        tokens += n
    return TopK(*(t.cpu() for t in top)), Density(*(t.cpu() for t in density)), tokens
