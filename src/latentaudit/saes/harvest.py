"""Harvest a model's residual-stream activations into shuffled, resumable safetensors shards.

Algorithm (:func:`harvest`):

1. Text -> token sequences of ``context_len`` (:func:`token_sequences`; the tokenizer adds no
   special tokens). ``pack``: every document is followed by EOS, the documents are concatenated
   and cut into chunks that each begin with BOS (when the tokenizer has one); the trailing
   partial chunk is dropped. ``truncate``: one sequence per document, [BOS] + its first tokens,
   right-padded inside a batch (padding positions are dropped).
2. Batches of ``batch_size`` sequences run only up to decoder layer L
   (:func:`~latentaudit.models.hooks.run_until`); the rows kept are resid_post of layer L
   (= Hugging Face ``hidden_states[L + 1]``) at positions >= ``skip_first``: position 0 (BOS,
   the attention sink) has a norm far larger than any other and is skipped by default.
3. Rows collect in a window of ``window_tokens`` (plus at most one batch). A full window is
   permuted (generator seeded with ``(seed, window index)``) and written as shards of at most
   ``shard_tokens`` rows (atomic writes); then the manifest is rewritten atomically with the
   shards, their sha256, the sequences consumed and the float64 running sum of the rows. Memory
   is bounded by the window whatever the corpus size.
4. A restarted harvest reads the manifest, skips the sequences already consumed and continues:
   the shards are identical to those of an uninterrupted run. ā (the mean activation used by
   attribution) = running sum / rows, over every harvested row (skipped positions excluded).

Reading (:class:`ActivationStore`) checks each shard against its recorded sha256 and header;
:func:`iter_batches` streams training batches from shards (chunk order permuted per epoch, rows
permuted per chunk) and can start at any row, which is how training resumes exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentaudit._io import save_safetensors, sha256_file, write_json
from latentaudit._progress import progress
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import pad_id
from latentaudit.models.hooks import run_until
from latentaudit.models.load import LoadedModel, parse_dtype

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "latentaudit-activations"
SCHEMA_VERSION = 1
PACKINGS = ("pack", "truncate")
# Manifest fields that must match for a harvest to continue an earlier one.
IDENTITY = ("model", "layer", "hook", "d_model", "context_len", "packing", "skip_first",
            "store_dtype", "shuffle", "seed", "batch_size", "shard_tokens", "window_tokens",
            "source")


@dataclass
class HarvestConfig:
    """How activations are harvested (see the module docstring)."""

    layer: int
    """0-indexed decoder layer whose output (resid_post) is harvested."""
    tokens: int
    """Number of activation rows (tokens) to harvest."""
    context_len: int = 128
    """Tokens per sequence, BOS included."""
    packing: str = field(default="pack", metadata={"choices": PACKINGS})
    """pack: concatenate documents (EOS between) and cut; truncate: one sequence per document."""
    skip_first: int = 1
    """Drop the first positions of every sequence (BOS / attention-sink outliers)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    shard_tokens: int = 65536
    """Most rows in one shard file."""
    window_tokens: int = 262144
    """Rows shuffled together before they are written (the memory bound)."""
    store_dtype: str = "bfloat16"
    """dtype of the rows on disk (bfloat16 halves the disk; float32 is exact)."""
    shuffle: bool = True
    """Permute the rows of each window before writing."""
    seed: int = 0
    """Seed of the window permutations."""

    def __post_init__(self) -> None:
        if self.packing not in PACKINGS:
            raise LatentAuditError(f"packing '{self.packing}' is not one of {', '.join(PACKINGS)}.")
        if self.tokens < 1 or self.batch_size < 1 or self.shard_tokens < 1:
            raise LatentAuditError("tokens, batch_size and shard_tokens must be positive.")
        if not 0 <= self.skip_first < self.context_len - 1:
            raise LatentAuditError(
                f"skip_first={self.skip_first} must be >= 0 and leave at least two positions of "
                f"context_len={self.context_len}.")
        if self.window_tokens < self.shard_tokens:
            raise LatentAuditError(
                f"window_tokens={self.window_tokens} must be >= shard_tokens={self.shard_tokens}.")
        try:
            parse_dtype(self.store_dtype)
        except LatentAuditError:
            raise LatentAuditError(
                f"store_dtype '{self.store_dtype}' is not a dtype: use bfloat16 or float32."
            ) from None


# -- text -> token sequences ----------------------------------------------------------------
def token_sequences(documents: Iterable[str], tokenizer, context_len: int,
                    packing: str = "pack", group: int = 64) -> Iterator[list[int]]:
    """Token id sequences of at most ``context_len`` (step 1 of the module docstring)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    head = [] if bos is None else [bos]
    body = context_len - len(head)
    buffer: list[int] = []
    docs = iter(documents)
    while block := list(itertools.islice(docs, group)):
        for ids in tokenizer(block, add_special_tokens=False)["input_ids"]:
            if packing == "truncate":
                if len(ids) + len(head) >= 2:
                    yield head + ids[:body]
                continue
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= body:
                yield head + buffer[:body]
                del buffer[:body]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0
              ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-pad sequences into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def layer_rows(loaded: LoadedModel, seqs: Sequence[Sequence[int]], layer: int,
               skip_first: int) -> Float[Tensor, "rows d_model"]:
    """resid_post of ``layer`` at real positions >= ``skip_first``, flattened in order."""
    pad = pad_id(loaded.tokenizer)
    ids, mask = pad_batch(seqs, pad)
    dev = loaded.device
    hidden = run_until(loaded.model, [layer], input_ids=ids.to(dev),
                       attention_mask=mask.to(dev))[layer]  # (B, T, D)
    keep = mask.bool().to(dev)  # (B, T)
    keep[:, :skip_first] = False
    return hidden[keep]  # (rows, D)


# -- the manifest ---------------------------------------------------------------------------
def _new_manifest(loaded: LoadedModel, cfg: HarvestConfig, source: str) -> dict:
    fields = asdict(cfg)
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": loaded.name,
            "hook": "resid_post", "d_model": loaded.d_model, "source": source,
            **{k: fields[k] for k in IDENTITY if k in fields},
            "target_tokens": cfg.tokens, "tokens": 0, "sequences_done": 0, "windows": 0,
            "complete": False, "shards": [], "sum": None}


def _continue_manifest(folder: Path, fresh: dict) -> dict:
    """The manifest to continue from: the one on disk (checked against ``fresh``) or ``fresh``."""
    path = folder / MANIFEST
    if not path.exists():
        return fresh
    old = read_manifest(folder)
    for key in IDENTITY:
        if old.get(key) != fresh[key]:
            raise LatentAuditError(
                f"{path}: '{key}' is {old.get(key)!r} but this run asks for {fresh[key]!r}: "
                "use the same settings to continue, or another output folder.")
    if old["tokens"] < fresh["target_tokens"]:
        old["complete"] = False
    old["target_tokens"] = fresh["target_tokens"]
    return old


def read_manifest(folder: Path) -> dict:
    """Read and check an activation folder's manifest.json."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LatentAuditError(f"{path} does not exist: harvest activations first.") from None
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}.") from err
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise LatentAuditError(
            f"{path} is not a version-{SCHEMA_VERSION} {FORMAT} manifest: harvest again.")
    return manifest


def _write_window(folder: Path, manifest: dict, rows: Tensor, cfg: HarvestConfig) -> None:
    """Shuffle one window of rows, write its shards, then record them in the manifest."""
    if cfg.shuffle:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + manifest["windows"])
        rows = rows[torch.randperm(len(rows), generator=g)]  # (N, D)
    n_shards = -(-len(rows) // cfg.shard_tokens)
    for part in torch.tensor_split(rows, n_shards):
        name = f"shard-{len(manifest['shards']):06d}.safetensors"
        save_safetensors(folder / name, {"activations": part})
        manifest["shards"].append(
            {"file": name, "tokens": len(part), "sha256": sha256_file(folder / name)})
    manifest["windows"] += 1


# -- the driver -----------------------------------------------------------------------------
def harvest(loaded: LoadedModel, sequences: Iterable[Sequence[int]], out: str | Path,
            cfg: HarvestConfig, *, source: str = "") -> ActivationStore:
    """Harvest ``cfg.tokens`` rows of layer ``cfg.layer`` into ``out`` (resumable).

    ``sequences`` must yield the same token sequences on every call (a restarted harvest skips
    those already consumed); ``source`` describes them and must match on a restart.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _continue_manifest(folder, _new_manifest(loaded, cfg, source))
    if manifest["complete"]:
        return ActivationStore(folder)
    store_dtype = parse_dtype(cfg.store_dtype)
    total = torch.zeros(loaded.d_model, dtype=torch.float64)
    if manifest["sum"] is not None:
        total += torch.tensor(manifest["sum"], dtype=torch.float64)
    seqs = itertools.islice(iter(sequences), manifest["sequences_done"], None)
    window: list[Tensor] = []
    in_window = consumed = 0
    with progress(total=cfg.tokens, desc="harvest", unit="tok") as bar:
        bar.update(manifest["tokens"])
        while manifest["tokens"] + in_window < cfg.tokens:
            batch = list(itertools.islice(seqs, cfg.batch_size))
            if not batch:
                break
            rows = layer_rows(loaded, batch, cfg.layer, cfg.skip_first)  # (R, D)
            rows = rows[:cfg.tokens - manifest["tokens"] - in_window]
            total += rows.double().sum(0).cpu()
            window.append(rows.to("cpu", store_dtype))
            in_window += len(rows)
            consumed += len(batch)
            bar.update(len(rows))
            if in_window >= cfg.window_tokens:
                _flush(folder, manifest, window, cfg, consumed, total)
                window, in_window, consumed = [], 0, 0
    if window:
        _flush(folder, manifest, window, cfg, consumed, total)
    if manifest["tokens"] < cfg.tokens:
        log.warning("The text ran out after %d of %d tokens; the harvest keeps what it has.",
                    manifest["tokens"], cfg.tokens)
    manifest["complete"] = True
    write_json(folder / MANIFEST, manifest)
    return ActivationStore(folder)


def _flush(folder: Path, manifest: dict, window: list[Tensor], cfg: HarvestConfig,
           consumed: int, total: Tensor) -> None:
    rows = torch.cat(window)  # (N, D)
    _write_window(folder, manifest, rows, cfg)
    manifest["tokens"] += len(rows)
    manifest["sequences_done"] += consumed
    manifest["sum"] = total.tolist()
    write_json(folder / MANIFEST, manifest)
    log.debug("harvest: %d rows written, %d sequences done", manifest["tokens"],
              manifest["sequences_done"])


# -- reading --------------------------------------------------------------------------------
class ChunkSource(Protocol):
    """Rows in chunks: what the trainer reads (an :class:`ActivationStore` or a tensor)."""

    chunk_sizes: list[int]

    def load(self, i: int) -> Float[Tensor, "rows d_model"]: ...


class ActivationStore:
    """A harvested activation folder: its manifest, ā, and verified shards."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.verify = verify
        self.chunk_sizes = [s["tokens"] for s in self.manifest["shards"]]
        self.d_model = int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def mean(self) -> Float[Tensor, " d_model"]:
        """ā: the mean of every harvested row (float32)."""
        if not self.n_tokens:
            raise LatentAuditError(f"{self.folder / MANIFEST} records no harvested tokens.")
        return (torch.tensor(self.manifest["sum"], dtype=torch.float64) / self.n_tokens).float()

    def load(self, i: int) -> Float[Tensor, "rows d_model"]:
        """Shard ``i``, checked against its recorded sha256 and shape."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        entry = self.manifest["shards"][i]
        path = self.folder / entry["file"]
        fix = f"delete {self.folder} and harvest again"
        if not path.exists():
            raise LatentAuditError(f"{path} is missing: {fix}.")
        if self.verify and sha256_file(path) != entry["sha256"]:
            raise LatentAuditError(
                f"{path} does not match the sha256 recorded in {MANIFEST} (corrupted or "
                f"changed): {fix}.")
        try:
            rows = load_file(str(path))["activations"]
        except (SafetensorError, KeyError, OSError) as err:
            raise LatentAuditError(f"{path} is not a readable activation shard ({err}): {fix}."
            ) from err
        if tuple(rows.shape) != (entry["tokens"], self.d_model):
            raise LatentAuditError(
                f"{path} holds shape {list(rows.shape)}, expected "
                f"[{entry['tokens']}, {self.d_model}]: {fix}.")
        return rows


class TensorChunks:
    """An in-memory tensor served as chunks of ``chunk_rows`` (for tests and small data)."""

    def __init__(self, x: Float[Tensor, "rows d_model"], chunk_rows: int) -> None:
        self.parts = list(torch.split(x, chunk_rows))
        self.chunk_sizes = [len(p) for p in self.parts]
        self.d_model = x.shape[1]

    def load(self, i: int) -> Float[Tensor, "rows d_model"]:
        return self.parts[i]


def _epoch_order(n_chunks: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_chunks, generator=g).tolist()


def _chunk_rows(source: ChunkSource, chunk: int, seed: int, epoch: int) -> Tensor:
    rows = source.load(chunk)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 65_537 + chunk)
    return rows[torch.randperm(len(rows), generator=g)]


def iter_batches(source: ChunkSource, batch_size: int, seed: int = 0, start_row: int = 0
                 ) -> Iterator[Float[Tensor, "batch d_model"]]:
    """Endless batches of rows, epoch after epoch, beginning at row ``start_row`` of the stream.

    Each epoch visits the chunks in a permuted order and each chunk's rows in a permuted order,
    both seeded by (seed, epoch[, chunk]), so the stream is the same on every call.
    """
    total = sum(source.chunk_sizes)
    if total == 0:
        raise LatentAuditError("There are no activation rows to train on.")
    epoch, skip = divmod(start_row, total)
    pending: list[Tensor] = []
    have = 0
    while True:
        for chunk in _epoch_order(len(source.chunk_sizes), seed, epoch):
            size = source.chunk_sizes[chunk]
            if skip >= size:
                skip -= size
                continue
            rows = _chunk_rows(source, chunk, seed, epoch)[skip:]  # (R, D)
            skip = 0
            pending.append(rows)
            have += len(rows)
            while have >= batch_size:
                flat = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield flat[:batch_size]
                pending, have = [flat[batch_size:]], have - batch_size
        epoch += 1
