"""On-policy sampling: N completions per prompt from the model under study, resumable.

Algorithm (one batch of rows; a row is one (prompt_id, sample_index)):

1. Prompt ids. A string prompt becomes one user message through the tokenizer's chat template
   (raw text when the tokenizer has none); chat messages go through the template as given. The
   system prompt is the row's own ``system``, else :attr:`SampleConfig.system`.
2. Left-pad the prompts; position ids are ``cumsum(attention_mask) - 1`` so a padded row computes
   what it would alone. One forward pass fills the KV cache (prefill).
3. Per step and row: softmax(logits / temperature); with ``top_p`` < 1 keep the smallest
   top-probability set whose mass reaches ``top_p`` (stable sort). Draw ``u ~ U[0, 1)`` from the
   row's own CPU generator and take the token where the kept cumulative mass first exceeds
   ``u · mass`` (inverse CDF, float64). Temperature 0 is greedy (argmax). The generator is
   seeded from sha256(seed, prompt_id, sample_index), so a completion does not depend on batch
   size, batch neighbours or resuming.
4. Feed the new tokens with the cache; a row stops at an EOS id (``finish_reason`` "eos"), when
   its decoded text contains a stop string ("stop") or after ``max_new_tokens`` ("length").
   Finished rows leave the cache.

Token ids (what attribution conditions on): ``prompt_token_ids`` are exactly the ids the model
read, ``completion_token_ids`` exactly those it generated, no padding, nothing after the end.
With "eos" the EOS id is KEPT as the last completion id (stopping is part of what the model
chose; its loss belongs to the completion) and ``completion`` is the decoding of the ids before
it. With "stop" the ids are cut to the longest prefix whose decoding ends before the stop
string, and ``completion`` is that decoding (a token that straddles the stop string is dropped
whole). So ``completion == decode(completion_token_ids[:-1] if eos else completion_token_ids)``.

Output: JSONL rows ``prompt_id, prompt, sample_index, completion, prompt_token_ids,
completion_token_ids, finish_reason, meta`` (the prompt's meta plus ``meta["sampling"]``: model,
parameters, seed and the row's sample seed), in prompt order then sample order. Next to it,
``<stem>.manifest.json`` holds the parameters. Each finished batch is appended and fsynced; a
rerun drops a torn last line, skips rows already present and refuses different parameters
(only ``n`` may grow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentaudit._io import write_json
from latentaudit._progress import progress
from latentaudit.data.behaviour import default_prompt_id
from latentaudit.data.tokens import prompt_ids
from latentaudit.errors import LatentAuditError
from latentaudit.models.load import LoadedModel
from latentaudit.suites import SuitePrompt as Prompt

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FINISH_REASONS = ("stop", "eos", "length")
# Manifest keys that must match when resuming; ``n`` may grow, the rest is informational.
MATCHED_KEYS = ("schema_version", "model", "dtype", "prompts_sha256", "system", "temperature",
                "top_p", "max_new_tokens", "stop", "seed")


@dataclass
class SampleConfig:
    """How to sample completions."""

    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this mass."""
    max_new_tokens: int = 200
    """Most tokens generated per completion."""
    stop: tuple[str, ...] = ()
    """Stop strings: a completion ends before the first one it contains."""
    seed: int = 0
    """Base seed; each (prompt_id, sample_index) derives its own, so runs are reproducible."""
    batch_size: int = 8
    """Completions generated together (does not change the results)."""
    system: str | None = None
    """System prompt for prompts that do not carry their own."""

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for flag, value, low in (("--n", self.n, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--batch-size", self.batch_size, 1), ("--seed", self.seed, None)):
            if isinstance(value, bool) or not isinstance(value, int) or (low and value < low):
                raise LatentAuditError(f"{flag} must be a whole number{f' ≥ {low}' if low else ''}"
                                       f", got {value!r}.")
        if not self.temperature >= 0:
            raise LatentAuditError(f"--temperature must be ≥ 0 (0 = greedy), got "
                                   f"{self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise LatentAuditError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise LatentAuditError(f"--stop strings must be non-empty, got {list(self.stop)!r}.")


class Generation(NamedTuple):
    """One generated completion."""

    token_ids: list[int]
    """Generated ids; ends with the EOS id when ``finish_reason`` is "eos"."""
    text: str
    """Decoded completion, without the EOS token and without the stop string."""
    finish_reason: str
    """"stop", "eos" or "length"."""


# ---- prompts ---------------------------------------------------------------------------------

def _parse_prompt(row: Any, where: str) -> Prompt:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        row = dataclasses.asdict(row)
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise LatentAuditError(f"{where}: expected a JSON object with a 'prompt' field.")
    prompt = row.get("prompt")
    messages_ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in prompt)
    if not (isinstance(prompt, str) or messages_ok):
        raise LatentAuditError(f"{where}: field 'prompt' must be a string or a non-empty list of "
                               "{'role', 'content'} chat messages.")
    system, meta = row.get("system"), row.get("meta") or {}
    if system is not None and not isinstance(system, str):
        raise LatentAuditError(f"{where}: field 'system' must be a string.")
    if not isinstance(meta, dict):
        raise LatentAuditError(f"{where}: field 'meta' must be an object.")
    extra = {k: v for k, v in row.items() if k not in ("prompt_id", "prompt", "system", "meta")}
    pid = row.get("prompt_id")
    return Prompt(prompt_id=default_prompt_id(prompt) if pid is None else str(pid),
                  prompt=prompt, system=system, meta={**meta, **extra})


def read_prompts(source: str | os.PathLike | list) -> list[Prompt]:
    """Prompts from a list of rows / strings, a .txt file (one prompt per line, the text is its
    id) or, through :func:`latentaudit.suites.load_prompts`, a JSONL file or built-in suite."""
    if isinstance(source, (list, tuple)):
        rows = [(row, f"prompt #{i}") for i, row in enumerate(source)]
    elif Path(source).suffix == ".txt" and Path(source).is_file():
        with open(source, encoding="utf-8") as f:
            rows = [(line.rstrip("\r\n"), f"{source}:{n}")
                    for n, line in enumerate(f, start=1) if line.strip()]
    else:
        from latentaudit.suites import load_prompts

        rows = [(row, f"{source} #{i}") for i, row in enumerate(load_prompts(source))]
    prompts, seen = [], {}
    for row, where in rows:
        p = _parse_prompt(row, where)
        if p.prompt_id in seen:
            raise LatentAuditError(f"{where}: prompt_id {p.prompt_id!r} repeats {seen[p.prompt_id]}"
                                   "; give each prompt a unique prompt_id.")
        seen[p.prompt_id] = where
        prompts.append(p)
    if not prompts:
        raise LatentAuditError(f"--prompts {source}: no prompts found.")
    return prompts


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]], system: str | None) -> list[int]:
    """Prompt token ids: chat template when the tokenizer has one (a string = one user turn)."""
    return prompt_ids(tokenizer, prompt, system)


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of one row: 63 bits of sha256(seed, prompt_id, sample_index)."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# ---- the math --------------------------------------------------------------------------------

def sample_tokens(logits: Float[Tensor, "batch vocab"], uniforms: Float[Tensor, " batch"],
                  temperature: float, top_p: float) -> Int[Tensor, " batch"]:
    """Temperature + top-p sampling by inverse CDF of each row's uniform (argmax if T = 0).

    With top_p = 1 the CDF runs in vocabulary order; otherwise over the probabilities sorted
    descending (stable), cut to the smallest prefix whose mass reaches top_p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
        probs = probs * ((probs.cumsum(dim=-1) - probs) < top_p)  # mass before a token < top_p
    cum = probs.cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cum)[:, None] * cum[:, -1:]  # (B, 1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    pick = torch.minimum(torch.searchsorted(cum, target, right=True), last)  # (B, 1)
    return (pick if order is None else order.gather(-1, pick)).squeeze(-1)


# ---- the generation loop ---------------------------------------------------------------------

def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """EOS ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    gen_cfg = getattr(loaded.model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def decode(tokenizer, ids: list[int]) -> str:
    """Exact decoding (special tokens kept, no clean-up of spaces)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_at_stop(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[list[int], str] | None:
    """If the decoded ids contain a stop string: the longest id prefix whose text ends before it."""
    text = decode(tokenizer, ids)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return None
    head = text[:min(hits)]
    k = len(ids) - 1
    while k > 0 and not head.startswith(decode(tokenizer, ids[:k])):
        k -= 1
    return ids[:k], decode(tokenizer, ids[:k])


def _finish(tokenizer, ids: list[int], eos: set[int], cfg: SampleConfig) -> Generation | None:
    if ids[-1] in eos:
        return Generation(ids, decode(tokenizer, ids[:-1]), "eos")
    if cfg.stop and (cut := cut_at_stop(tokenizer, ids, cfg.stop)) is not None:
        return Generation(cut[0], cut[1], "stop")
    if len(ids) >= cfg.max_new_tokens:
        return Generation(ids, decode(tokenizer, ids), "length")
    return None


@torch.no_grad()
def generate(loaded: LoadedModel, prompts: list[list[int]], seeds: list[int],
             cfg: SampleConfig) -> list[Generation]:
    """Sample one completion per prompt id list with a KV cache; row b draws from seeds[b].

    Hooks registered on the model (e.g. steering) stay active throughout.
    """
    if not prompts:
        return []
    model, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = eos_token_ids(loaded)
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    pos = (mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, T)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in range(B)]
    done: list[Generation | None] = [None] * B
    rows, past, extra = list(range(B)), None, _logits_kwargs(model)  # rows: prompt of cache row
    while True:
        res = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                    past_key_values=past, use_cache=True, **extra)
        past = res.past_key_values
        logits = res.logits[:, -1].float()  # (A, V), sampled on the model's device
        u = torch.zeros(len(rows), dtype=torch.float64)  # (A,)
        for j, r in enumerate(rows):
            if done[r] is None:
                u[j] = torch.rand((), generator=gens[r], dtype=torch.float64)
        nxt = sample_tokens(logits, u, cfg.temperature, cfg.top_p).cpu()  # (A,)
        for j, r in enumerate(rows):
            if done[r] is None:
                out[r].append(int(nxt[j]))
                done[r] = _finish(tok, out[r], eos, cfg)
        keep = [j for j, r in enumerate(rows) if done[r] is None]
        if not keep:
            return list(done)
        if len(keep) < len(rows) and hasattr(past, "batch_select_indices"):
            past.batch_select_indices(torch.tensor(keep, device=dev))
            rows, mask, pos, nxt = [rows[j] for j in keep], mask[keep], pos[keep], nxt[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (A, T + 1)
        pos = pos[:, -1:] + 1  # (A, 1)
        ids = nxt[:, None]  # (A, 1); rows already finished but still cached are ignored


def _logits_kwargs(model) -> dict[str, int]:
    """Ask for the last position's logits only, where the model supports it."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


# ---- the driver: manifest, resume, batches ---------------------------------------------------

def manifest_path(out_path: str | os.PathLike) -> Path:
    """``completions.jsonl`` -> ``completions.manifest.json``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.manifest.json")


def _manifest(loaded: LoadedModel, prompts: list[Prompt], cfg: SampleConfig, source: str) -> dict:
    canon = json.dumps([dataclasses.asdict(p) for p in prompts], sort_keys=True, ensure_ascii=False)
    dtype = next(loaded.model.parameters()).dtype
    return {"schema_version": SCHEMA_VERSION, "model": loaded.name, "model_path": loaded.path,
            "dtype": str(dtype).removeprefix("torch."), "prompts": source,
            "prompts_sha256": hashlib.sha256(canon.encode()).hexdigest(),
            "n_prompts": len(prompts), "n": cfg.n, "system": cfg.system,
            "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "seed": cfg.seed,
            "batch_size": cfg.batch_size, "device": str(loaded.device)}


def _check_manifest(old: dict, new: dict, path: Path) -> None:
    for key in MATCHED_KEYS:
        if old.get(key) != new[key]:
            what = "the prompts" if key == "prompts_sha256" else f"{key}={old.get(key)!r}"
            raise LatentAuditError(
                f"{path}: the existing completions were sampled with {what}, this run differs "
                f"({key}={new[key]!r}); rerun with the same parameters or choose another --out.")
    if new["n"] < old.get("n", 0):
        raise LatentAuditError(f"{path}: the existing completions were sampled with --n "
                               f"{old['n']}; --n may grow when resuming but not shrink.")


def _load_done(out: Path) -> set[tuple[str, int]]:
    """(prompt_id, sample_index) of the complete rows; a torn last line is cut off the file."""
    with open(out, "rb+") as f:
        data = f.read()
        good = data.rfind(b"\n") + 1
        if good < len(data):
            log.warning("%s: dropping a torn last line (an interrupted write)", out)
            f.truncate(good)
    done = set()
    for n, line in enumerate(data[:good].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((str(row["prompt_id"]), int(row["sample_index"])))
        except (ValueError, KeyError, TypeError):
            raise LatentAuditError(f"{out}:{n}: not a completion row; move the file away or "
                                   "choose another --out.") from None
    return done


def _row(loaded: LoadedModel, p: Prompt, index: int, ids: list[int], g: Generation,
         cfg: SampleConfig) -> dict:
    sampling = {"model": loaded.name, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "seed": cfg.seed,
                "sample_seed": sample_seed(cfg.seed, p.prompt_id, index),
                "system": p.system if p.system is not None else cfg.system}
    return {"prompt_id": p.prompt_id, "prompt": p.prompt, "sample_index": index,
            "completion": g.text, "prompt_token_ids": ids, "completion_token_ids": g.token_ids,
            "finish_reason": g.finish_reason, "meta": {**p.meta, "sampling": sampling}}


def _encode(loaded: LoadedModel, p: Prompt, cfg: SampleConfig) -> list[int]:
    ids = encode_prompt(loaded.tokenizer, p.prompt, p.system if p.system is not None
                        else cfg.system)
    if not ids:
        raise LatentAuditError(f"prompt {p.prompt_id!r} has no tokens; give it some text.")
    return ids


def sample_completions(model: LoadedModel, prompts: str | os.PathLike | list,
                       cfg: SampleConfig, out_path: str | os.PathLike) -> Path:
    """Sample ``cfg.n`` completions per prompt into ``out_path`` (JSONL), resuming if present."""
    out = Path(out_path)
    items = read_prompts(prompts)
    source = "list" if isinstance(prompts, (list, tuple)) else str(prompts)
    manifest, mpath = _manifest(model, items, cfg, source), manifest_path(out)
    done = _load_done(out) if out.exists() else set()
    if done:
        if not mpath.is_file():
            raise LatentAuditError(f"{out} holds completions but its manifest {mpath.name} is "
                                   "missing; move the file away or choose another --out.")
        _check_manifest(json.loads(mpath.read_text(encoding="utf-8")), manifest, mpath)
    write_json(mpath, manifest)
    todo = [(p, i) for p in items for i in range(cfg.n) if (p.prompt_id, i) not in done]
    if done:
        log.info("%s: %d completions present, %d to go", out, len(done), len(todo))
    encoded: dict[str, list[int]] = {}
    n_tokens, start = 0, time.perf_counter()
    with open(out, "a", encoding="utf-8") as f, \
            progress(total=len(todo), desc="sample", unit="completion") as bar:
        for k in range(0, len(todo), cfg.batch_size):
            batch = todo[k:k + cfg.batch_size]
            for p, _ in batch:
                if p.prompt_id not in encoded:
                    encoded[p.prompt_id] = _encode(model, p, cfg)
            ids = [encoded[p.prompt_id] for p, _ in batch]
            seeds = [sample_seed(cfg.seed, p.prompt_id, i) for p, i in batch]
            gens = generate(model, ids, seeds, cfg)
            f.write("".join(json.dumps(_row(model, p, i, pid, g, cfg), ensure_ascii=False) + "\n"
                            for (p, i), pid, g in zip(batch, ids, gens, strict=True)))
            f.flush()
            os.fsync(f.fileno())
            n_tokens += sum(len(g.token_ids) for g in gens)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    log.info("sampled %d completions, %d tokens in %.1f s (%.1f tokens/s)", len(todo), n_tokens,
             seconds, n_tokens / max(seconds, 1e-9))
    return out
