"""Top-activating examples and activation density of every latent of an SAE over reference text.

1. The corpus (``held-out``: the held-out split of the training mix, ``outside``, a source name
   of ``latentaudit data fetch``, or the user's ``.txt`` / ``.jsonl`` files) is packed into
   sequences of ``context_len`` tokens exactly as ``sae evaluate`` does
   (:func:`~latentaudit.saes.evaluate.text_documents`,
   :func:`~latentaudit.saes.harvest.token_sequences`), streamed, ⌈tokens / (context_len −
   skip_first)⌉ of them.
2. Each batch runs only up to layer L (:func:`~latentaudit.models.hooks.run_until`); the SAE
   encodes resid_post at positions >= ``skip_first``; :func:`~.topk.merge_topk` merges the
   activations of every latent into the running top-k with context windows, and
   :func:`~.topk.update_density` counts firing tokens and the activation histogram. Both are
   per latent, so an SAE streamed from host memory runs a latent chunk at a time
   (:func:`~latentaudit.saes.stream.encode_chunks`) with the same result. A batch that runs out
   of device memory is merged as two halves (:class:`~latentaudit.batching.BatchGuard`): the
   state is replaced only when a slice succeeds, and merging in order keeps what one merge
   would.
3. The state is cached per SAE in ``<cache>/explain/examples-<key>.safetensors`` (key: sha256 of
   the SAE's files, the model, its dtype, the layer, the corpus and its file hashes or pinned
   integrities, and every size), checkpointed atomically every ``checkpoint_seconds`` while the
   pass runs: a killed pass resumes, a finished one is read back without running the model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from time import monotonic
from typing import NamedTuple

import torch

from latentaudit._io import save_safetensors, sha256_file
from latentaudit._progress import end_at_count, progress
from latentaudit.batching import guard_for, resolve_batch_size
from latentaudit.data.corpus import (
    SOURCES,
    TRAINING_SOURCES,
    corpus_dir,
    default_cache_dir,
    read_manifest,
)
from latentaudit.explain.config import ExplainConfig
from latentaudit.explain.topk import (
    Density,
    TopK,
    empty_density,
    empty_topk,
    merge_topk,
    update_density,
)
from latentaudit.models.forward import pad_id
from latentaudit.models.hooks import layer_device, run_until
from latentaudit.saes.harvest import pad_batch, token_sequences
from latentaudit.saes.sae import SAE
from latentaudit.saes.stream import encode_chunks

log = logging.getLogger(__name__)

EXAMPLES_VERSION = 1
"""Bump when the pass changes, so old caches are not reused."""
BUILT_IN_TEXTS = {"held-out": None, "outside": ["gutenberg"]}
"""Corpus specs that name built-in text, and the sources they read (None: the training mix)."""


class CorpusExamples(NamedTuple):
    """The result of the pass for one SAE."""

    top: TopK
    density: Density
    tokens: int
    """Token positions seen (positions >= skip_first of every sequence)."""
    sequences: int
    key: str
    path: Path
    """The cache file."""


def n_sequences(cfg: ExplainConfig) -> int:
    """Sequences that cover ``cfg.corpus_tokens`` positions."""
    return math.ceil(cfg.corpus_tokens / (cfg.context_len - cfg.skip_first))


def corpus_sequences(cfg: ExplainConfig, tokenizer) -> Iterator[list[int]]:
    """Packed token sequences of the corpus, shared between its streams as ``sae evaluate``."""
    from latentaudit.saes.evaluate import text_documents

    streams = text_documents(cfg.corpus)
    n = n_sequences(cfg)
    per = [n // len(streams) + (i < n % len(streams)) for i in range(len(streams))]
    for docs, k in zip(streams, per, strict=True):
        yield from itertools.islice(token_sequences(docs, tokenizer, cfg.context_len), k)


def sae_fingerprint(sae: SAE) -> str:
    """sha256 of the SAE's files (its weights and config), else of its tensors."""
    h = hashlib.sha256()
    path = Path(sae.info.source_path) if sae.info.source_path else None
    if path is not None and path.is_file():
        h.update(sha256_file(path).encode())
    elif path is not None and path.is_dir():
        for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            h.update(f"{file.name}:{sha256_file(file)};".encode())
    else:
        for name, t in sorted(sae.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().float().numpy().tobytes())
        h.update(json.dumps(sae.config_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def corpus_fingerprint(spec: str) -> dict:
    """What identifies the corpus text: pinned integrities of built-in sources, file hashes."""
    if spec in BUILT_IN_TEXTS or spec in SOURCES:
        cached = read_manifest(corpus_dir())["sources"]
        names = BUILT_IN_TEXTS.get(spec, [spec]) or [n for n in TRAINING_SOURCES if n in cached]
        return {n: [cached.get(n, {}).get("integrity"), cached.get(n, {}).get("cleaner_version")]
                for n in names}
    path = Path(spec).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()) \
        if path.is_dir() else [path]
    return {str(f): sha256_file(f) for f in files if f.is_file()}


def cache_key(sae: SAE, model_name: str, dtype: str, layer: int, cfg: ExplainConfig) -> str:
    """The key of the per-SAE cache (step 3 of the module docstring)."""
    blob = {"version": EXAMPLES_VERSION, "sae": sae_fingerprint(sae), "model": model_name,
            "dtype": dtype, "layer": layer, "corpus": cfg.corpus,
            "corpus_files": corpus_fingerprint(cfg.corpus),
            "corpus_tokens": cfg.corpus_tokens, "context_len": cfg.context_len,
            "skip_first": cfg.skip_first, "examples": cfg.examples,
            "before": cfg.context_before, "after": cfg.context_after}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(key: str, cache_dir: str | os.PathLike | None) -> Path:
    """The cache file: ``<cache_dir or $LATENTAUDIT_CACHE>/explain/examples-<key>.safetensors``."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "explain" / f"examples-{key}.safetensors"


class CachedPass(NamedTuple):
    """What the example cache holds for one key."""

    top: TopK
    density: Density
    tokens: int
    done: int
    """Corpus sequences scanned."""
    complete: bool
    """The pass reached the end of the corpus."""


def read_cache(path: Path, key: str) -> CachedPass | None:
    """The pass cached in ``path`` under this key (None when there is none)."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    top = TopK(*(t[name] for name in TopK._fields))
    return CachedPass(top, Density(t["fired"], t["histogram"]), int(meta["tokens"]),
                      int(meta["sequences_done"]), meta.get("complete") == "true")


def save_cache(path: Path, key: str, top: TopK, density: Density, tokens: int, done: int,
               complete: bool) -> None:
    """Write a pass's state to the cache (atomically)."""
    tensors = {**top._asdict(), "fired": density.fired, "histogram": density.histogram}
    save_safetensors(path, tensors, metadata={
        "key": key, "tokens": str(tokens), "sequences_done": str(done),
        "complete": "true" if complete else "false", "version": str(EXAMPLES_VERSION)})


def is_cached(key: str, cache_dir: str | os.PathLike | None) -> bool:
    """Whether a finished pass with this key is cached (so no corpus is needed)."""
    got = read_cache(cache_path(key, cache_dir), key)
    return got is not None and got.complete


def corpus_examples(loaded, sae: SAE, layer: int, cfg: ExplainConfig, key: str,
                    cache_dir: str | os.PathLike | None = None,
                    checkpoint_seconds: float = 120.0, chunk: int | None = None
                    ) -> CorpusExamples:
    """Run (or resume, or read back) the pass of the module docstring for one SAE.

    ``chunk``: latents per streamed chunk of the SAE (default: all at once).
    """
    path = cache_path(key, cache_dir)
    got = read_cache(path, key)
    if got is not None and got.complete:
        log.info("top-activating examples of layer %d read from the cache %s", layer, path)
        return CorpusExamples(got.top, got.density, got.tokens, got.done, key, path)
    dev = layer_device(loaded.model, layer)
    if got is None:
        top = empty_topk(sae.d_sae, cfg.examples, cfg.context_before, cfg.context_after, dev)
        density, tokens, done = empty_density(sae.d_sae, dev), 0, 0
    else:
        top = TopK(*(t.to(dev) for t in got.top))
        density, tokens, done = Density(*(t.to(dev) for t in got.density)), got.tokens, got.done
        log.info("resuming the corpus pass of layer %d after %d sequences", layer, done)
    pad = pad_id(loaded.tokenizer)
    seqs = itertools.islice(corpus_sequences(cfg, loaded.tokenizer), done, None)
    total = n_sequences(cfg)
    last = monotonic()
    what = f"top examples L{layer}"
    size = resolve_batch_size(cfg.batch_size, loaded.model, loaded.device, "forward",
                              cfg.context_len, 8, what)
    guard = guard_for(loaded.model, "explain scan")
    state = [top, density, tokens]

    def scan(rows: list[int]) -> None:
        ids, mask = (t.to(loaded.device) for t in pad_batch([batch[r] for r in rows], pad))
        new_top, new_density, n = merge_batch(loaded.model, sae, layer, ids, mask,
                                               done + rows[0], state[0], state[1], cfg, chunk)
        state[:] = [new_top, new_density, state[2] + n]  # only once the slice succeeded

    with progress(total=total, desc=what, unit="seq", initial=done) as bar:
        while batch := list(itertools.islice(seqs, size)):
            guard.run(list(range(len(batch))), scan)
            top, density, tokens = state
            done += len(batch)
            bar.update(len(batch))
            if checkpoint_seconds and monotonic() - last >= checkpoint_seconds:
                save_cache(path, key, top, density, tokens, done, complete=False)
                last = monotonic()
        if done < total:
            log.info("the reference text ran out after %d of the %d sequences asked for",
                     done, total)
        end_at_count(bar)
    save_cache(path, key, top, density, tokens, done, complete=True)
    cpu = TopK(*(t.cpu() for t in top))
    return CorpusExamples(cpu, Density(*(t.cpu() for t in density)), tokens, done, key, path)


@torch.no_grad()
def merge_batch(model, sae: SAE, layer: int, ids, mask, first: int, top: TopK,
                 density: Density, cfg: ExplainConfig, chunk: int | None = None
                 ) -> tuple[TopK, Density, int]:
    """Step 2 for one batch, in row blocks and latent chunks that keep the latent tensor near
    128 MB; returns new state (``top`` and ``density`` are not changed)."""
    hidden = run_until(model, [layer], sae.read_point, input_ids=ids,
                       attention_mask=mask)[layer]  # (B, T, D)
    B, T = ids.shape
    dev = top.values.device
    real = mask.to(dev).bool()  # (B, T)
    valid = real.clone()
    valid[:, :cfg.skip_first] = False
    ids = ids.to(dev).masked_fill(~real, -1)
    chunk = chunk or sae.d_sae
    rows = max(1, (1 << 25) // (T * chunk))
    for s in range(0, B, rows):
        h = hidden[s:s + rows].to(dev)  # (b, T, D)
        b = h.shape[0]
        seq = torch.arange(first + s, first + s + b, device=dev)
        v = valid[s:s + rows]  # (b, T)
        tops, dens = [], []
        for c, f in encode_chunks(sae, h.reshape(b * T, -1), chunk):
            n = f.shape[1]
            f = f.float().view(b, T, n) * real[s:s + rows, :, None]  # (b, T, n) 0 on padding
            part = TopK(*(t[c:c + n] for t in top))
            tops.append(merge_topk(part, f, ids[s:s + rows], v, seq, cfg.context_before,
                                   cfg.context_after))
            dens.append(update_density(Density(*(t[c:c + n] for t in density)), f[v]))
        top = TopK(*(torch.cat(parts) for parts in zip(*tops, strict=True)))
        density = Density(*(torch.cat(parts) for parts in zip(*dens, strict=True)))
    return top, density, int(valid.sum())
