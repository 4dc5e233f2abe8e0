"""On-policy sampling: N completions per prompt from the model under study, resumable.

Algorithm:

1. Check every input before any model loads (:func:`plan_sampling`): the prompts, the
   parameters, and any completions already in the output file against its manifest.
2. Prompt ids. A string prompt becomes one user message through the tokenizer's chat template
   (raw text when the tokenizer has none); chat messages go through the template as given. The
   system prompt is the row's own ``system``, else :attr:`SampleConfig.system`.
3. Rows (one per (prompt_id, sample_index)) go in batches through
   :func:`~latentaudit.generate.generate`: left-padded prefill, then temperature / top-p
   sampling with a KV cache until EOS, a stop string or ``max_new_tokens``. Each row's random
   generator is seeded from sha256(seed, prompt_id, sample_index), so a completion does not
   depend on batch size, batch neighbours or resuming.

Token ids (what attribution conditions on): ``prompt_token_ids`` are exactly the ids the model
read, ``completion_token_ids`` exactly those it generated (EOS kept; see
:mod:`latentaudit.generate`), so ``completion == decode(completion_token_ids[:-1] if eos else
completion_token_ids)``.

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
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentaudit._io import append_jsonl, complete_lines, write_json
from latentaudit._progress import progress
from latentaudit.data.behaviour import default_prompt_id
from latentaudit.data.tokens import is_chat_messages, prompt_ids
from latentaudit.errors import LatentAuditError
from latentaudit.generate import (  # noqa: F401  (re-exported: latentaudit.sample is public)
    Generation,
    cut_at_stop,
    decode,
    eos_token_ids,
    generate,
    sample_tokens,
)
from latentaudit.models.load import LoadedModel
from latentaudit.options import OptionError, whole
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
    """Completions generated together (does not change the results; 0 or auto: chosen from free
    device memory)."""
    system: str | None = None
    """System prompt for prompts that do not carry their own."""

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for name, low in (("n", 1), ("max_new_tokens", 1), ("batch_size", 0), ("seed", None)):
            whole(name, getattr(self, name), low)
        if not self.temperature >= 0:
            raise OptionError("temperature", f"{{}} must be ≥ 0 (0 = greedy), got "
                                             f"{self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"{{}} must be in (0, 1], got {self.top_p}.")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise OptionError("stop", f"{{}} strings must be non-empty, got {list(self.stop)!r}.")


# ---- prompts ---------------------------------------------------------------------------------

def _parse_prompt(row: Any, where: str) -> Prompt:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        row = dataclasses.asdict(row)
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise LatentAuditError(f"{where}: expected a JSON object with a 'prompt' field.")
    prompt = row.get("prompt")
    if not (isinstance(prompt, str) or is_chat_messages(prompt)):
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


# ---- the driver: manifest, resume, batches ---------------------------------------------------

def manifest_path(out_path: str | os.PathLike) -> Path:
    """``completions.jsonl`` -> ``completions.manifest.json``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.manifest.json")


@dataclass
class SamplePlan:
    """What :func:`plan_sampling` checked: the prompts, the parameters and the work left."""

    prompts: list[Prompt]
    cfg: SampleConfig
    out: Path
    source: str
    """Where the prompts came from (a file, a suite name or "list")."""
    done: set[tuple[str, int]] = field(default_factory=set)
    """(prompt_id, sample_index) of the rows already in ``out``."""
    previous: dict[str, Any] | None = None
    """The manifest of the rows already in ``out``."""

    @property
    def todo(self) -> list[tuple[Prompt, int]]:
        return [(p, i) for p in self.prompts for i in range(self.cfg.n)
                if (p.prompt_id, i) not in self.done]


def plan_sampling(prompts: str | os.PathLike | list, cfg: SampleConfig,
                  out_path: str | os.PathLike, model: str | None = None,
                  dtype: str | None = None) -> SamplePlan:
    """Read and check the prompts and any earlier output, before a model is loaded.

    ``model`` (the name that will be loaded) and ``dtype`` (e.g. "float32"), when given, are
    checked against the earlier output's manifest too; otherwise that happens after loading.
    """
    out = Path(out_path)
    plan = SamplePlan(read_prompts(prompts), cfg, out,
                      "list" if isinstance(prompts, (list, tuple)) else str(prompts))
    plan.done = _load_done(out) if out.exists() else set()
    if plan.done:
        mpath = manifest_path(out)
        if not mpath.is_file():
            raise LatentAuditError(f"{out} holds completions but its manifest {mpath.name} is "
                                   "missing; move the file away or choose another --out.")
        try:
            plan.previous = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LatentAuditError(f"{mpath}:{err.lineno}: not valid JSON ({err.msg}); restore "
                                   "it, or move the completions away and start again.") from None
        known = {k: v for k, v in (("model", model), ("dtype", dtype)) if v is not None}
        _check_manifest(plan.previous, {**_settings(plan), **known}, mpath)
    return plan


def _settings(plan: SamplePlan) -> dict[str, Any]:
    """The manifest fields that need no model."""
    cfg = plan.cfg
    canon = json.dumps([dataclasses.asdict(p) for p in plan.prompts], sort_keys=True,
                       ensure_ascii=False)
    return {"schema_version": SCHEMA_VERSION, "prompts": plan.source,
            "prompts_sha256": hashlib.sha256(canon.encode()).hexdigest(),
            "n_prompts": len(plan.prompts), "n": cfg.n, "system": cfg.system,
            "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "seed": cfg.seed,
            "batch_size": cfg.batch_size}


def model_manifest(loaded: LoadedModel, plan: SamplePlan) -> dict[str, Any]:
    """The manifest of a run of ``plan`` on ``loaded``."""
    dtype = next(loaded.model.parameters()).dtype
    return {"schema_version": SCHEMA_VERSION, "model": loaded.name, "model_path": loaded.path,
            "dtype": str(dtype).removeprefix("torch."), **_settings(plan),
            "device": str(loaded.device),
            **({"adapter": loaded.adapter} if getattr(loaded, "adapter", None) else {})}


def record_manifest(plan: SamplePlan, manifest: dict[str, Any]) -> None:
    """Refuse to add to earlier output made with other parameters; write the manifest."""
    mpath = manifest_path(plan.out)
    if plan.previous is not None:
        _check_manifest(plan.previous, manifest, mpath)
    write_json(mpath, manifest)


def _check_manifest(old: dict, new: dict, path: Path) -> None:
    """Refuse to resume with other parameters; checks the keys of ``new`` only."""
    for key in MATCHED_KEYS:
        if key in new and old.get(key) != new[key]:
            what = "the prompts" if key == "prompts_sha256" else f"{key}={old.get(key)!r}"
            raise LatentAuditError(
                f"{path}: the existing completions were sampled with {what}, this run differs "
                f"({key}={new[key]!r}); rerun with the same parameters or choose another --out.")
    if new["n"] < old.get("n", 0):
        raise LatentAuditError(f"{path}: the existing completions were sampled with --n "
                               f"{old['n']}; --n may grow when resuming but not shrink.")


def _load_done(out: Path) -> set[tuple[str, int]]:
    """(prompt_id, sample_index) of the complete rows; a torn last line is cut off the file."""
    done = set()
    for n, line in enumerate(complete_lines(out), start=1):
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


def encode_row_prompt(loaded: LoadedModel, p: Prompt, cfg: SampleConfig) -> list[int]:
    """A prompt row's token ids (its own system prompt, else the config's); never empty."""
    ids = encode_prompt(loaded.tokenizer, p.prompt, p.system if p.system is not None
                        else cfg.system)
    if not ids:
        raise LatentAuditError(f"prompt {p.prompt_id!r} has no tokens; give it some text.")
    return ids


def generation_batch_size(model: LoadedModel, cfg: SampleConfig, prompt_tokens: int,
                          what: str) -> int:
    """``cfg.batch_size``, or (when 0) rows of ``prompt_tokens`` + ``max_new_tokens`` tokens
    that fit in free device memory (:mod:`latentaudit.batching`)."""
    from latentaudit.batching import resolve_batch_size

    return resolve_batch_size(cfg.batch_size, model.model, model.device, "generate",
                              prompt_tokens + cfg.max_new_tokens, 8, what)


def sample_rows(model: LoadedModel, batch: list[tuple[Prompt, int]], cfg: SampleConfig,
                encoded: dict[str, list[int]]) -> list[dict]:
    """The output rows of one batch of (prompt, sample index); ``encoded`` caches prompt ids."""
    for p, _ in batch:
        if p.prompt_id not in encoded:
            encoded[p.prompt_id] = encode_row_prompt(model, p, cfg)
    ids = [encoded[p.prompt_id] for p, _ in batch]
    seeds = [sample_seed(cfg.seed, p.prompt_id, i) for p, i in batch]
    gens = generate(model, ids, seeds, cfg)
    return [_row(model, p, i, pid, g, cfg) for (p, i), pid, g in zip(batch, ids, gens, strict=True)]


def sample_completions(model: LoadedModel, prompts: str | os.PathLike | list,
                       cfg: SampleConfig, out_path: str | os.PathLike) -> Path:
    """Sample ``cfg.n`` completions per prompt into ``out_path`` (JSONL), resuming if present."""
    return run_sampling(model, plan_sampling(prompts, cfg, out_path))


def run_sampling(model: LoadedModel, plan: SamplePlan) -> Path:
    """Sample what :func:`plan_sampling` found left to do; returns the output file."""
    cfg, out = plan.cfg, plan.out
    record_manifest(plan, model_manifest(model, plan))
    todo = plan.todo
    if plan.done:
        log.info("%s: %d completions present, %d to go", out, len(plan.done), len(todo))
    encoded: dict[str, list[int]] = {}
    for p, _ in todo:
        if p.prompt_id not in encoded:
            encoded[p.prompt_id] = encode_row_prompt(model, p, cfg)
    size = generation_batch_size(model, cfg, max(map(len, encoded.values()), default=1), "sample")
    n_tokens, start = 0, time.perf_counter()
    with open(out, "a", encoding="utf-8") as f, \
            progress(total=len(todo), desc="sample", unit="completion") as bar:
        for k in range(0, len(todo), size):
            batch = todo[k:k + size]
            rows = sample_rows(model, batch, cfg, encoded)
            append_jsonl(f, rows)
            n_tokens += sum(len(r["completion_token_ids"]) for r in rows)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    log.info("sampled %d completions, %d tokens in %.1f s (%.1f tokens/s)", len(todo), n_tokens,
             seconds, n_tokens / max(seconds, 1e-9))
    return out
