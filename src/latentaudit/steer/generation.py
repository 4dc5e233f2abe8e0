"""Generate the steered completions of many conditions, resumably (step 6 of the sweep).

A row is (condition key, prompt, sample index). Its seed is the sampler's seed of (prompt,
sample), the same under every condition (common random numbers). Rows are batched whatever their
condition; each carries its condition's vector (:class:`~latentaudit.models.hooks.RowSteering`).
Each finished batch is appended to the JSONL file and fsynced; rows already in the file are
skipped, and a torn last line from a kill is cut off. Rows are generated rank by rank across the
selection methods (the baseline, then every method's first latent, then every method's second, ...)
and by prompt length within a rank (less padding): a sweep stopped early has compared the
methods on their top latents rather than finished one method.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._io import append_jsonl, complete_lines
from latentaudit._progress import progress
from latentaudit.errors import LatentAuditError
from latentaudit.generate import generate
from latentaudit.models.hooks import RowSteering
from latentaudit.models.load import LoadedModel
from latentaudit.sample import SampleConfig, generation_batch_size, sample_seed
from latentaudit.steer.config import Condition

log = logging.getLogger(__name__)
Row = tuple[str, str, int]  # (condition key, prompt_id, sample_index)


def read_rows(path: Path) -> dict[Row, dict[str, Any]]:
    """The rows already generated, by (key, prompt_id, sample_index); a torn tail is cut off."""
    if not path.is_file():
        return {}
    rows = {}
    for n, line in enumerate(complete_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[(row["key"], row["prompt_id"], int(row["sample_index"]))] = row
        except (ValueError, KeyError, TypeError):
            raise LatentAuditError(f"{path}:{n}: not a steered-completion row; move the file "
                                   "away to generate again.") from None
    return rows


def generate_rows(loaded: LoadedModel, layer: int, todo: Sequence[tuple[Condition, str, int]],
                  prompt_ids: dict[str, list[int]], vectors: dict[str, Float[Tensor, " d_model"]],
                  cfg: SampleConfig, path: Path, desc: str = "steer",
                  point: str = "resid_post") -> int:
    """Generate ``todo`` rows (condition, prompt_id, sample_index) into ``path``, steering at
    hook point ``point`` of ``layer``; returns the count."""
    if not todo:
        return 0
    longest = max(len(prompt_ids[pid]) for _, pid, _ in todo)
    size = generation_batch_size(loaded, cfg, longest, desc)
    with open(path, "a", encoding="utf-8") as f, \
            progress(total=len(todo), desc=desc, unit="completion") as bar:
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            append_jsonl(f, steered_rows(loaded, layer, batch, prompt_ids, vectors, cfg, point))
            bar.update(len(batch))
    return len(todo)


def steered_rows(loaded: LoadedModel, layer: int, batch: Sequence[tuple[Condition, str, int]],
                 prompt_ids: dict[str, list[int]],
                 vectors: dict[str, Float[Tensor, " d_model"]], cfg: SampleConfig,
                 point: str = "resid_post") -> list[dict]:
    """The rows of one batch of (condition, prompt_id, sample_index), each with its vector
    added at hook point ``point`` of ``layer``."""
    seeds = [sample_seed(cfg.seed, pid, i) for _, pid, i in batch]
    steering = RowSteering(layer, torch.stack([vectors[c.key] for c, _, _ in batch]), point)
    gens = generate(loaded, [prompt_ids[pid] for _, pid, _ in batch], seeds, cfg,
                    steering=steering)
    return [{"key": c.key, "prompt_id": pid, "sample_index": i, "completion": g.text,
             "completion_token_ids": g.token_ids, "finish_reason": g.finish_reason}
            for (c, pid, i), g in zip(batch, gens, strict=True)]


# ---- the sweep's view: which rows are missing, and their grades -------------------------------

@dataclass
class Context:
    """What the sweep's steps share once the models are loaded."""

    plan: Any
    """The :class:`~latentaudit.steer.sweep.SteerPlan`."""
    models: dict[str, LoadedModel]
    enc: dict[str, dict[str, list[int]]]
    """Prompt token ids per model key and prompt_id."""
    dirs: Float[Tensor, "d_sae d_model"]
    rbar: float | None
    scfg: SampleConfig
    path: Path
    judges: dict[str, Any] = field(default_factory=dict)
    remote: Any = None
    """Generates rows on Ray workers instead (:class:`~latentaudit.distributed.steer.RemoteRows`,
    same signature as :func:`generate_rows`); None: here."""


def generate_missing(ctx: Context, conds: Sequence[Condition],
                     units: Sequence[tuple[str, int]]) -> int:
    """Generate every (condition, unit) row not yet in the file, per model; returns the count."""
    from latentaudit.steer.vectors import condition_vectors

    done = read_rows(ctx.path)
    uniq = {c.key: c for c in conds}
    n = 0
    for name, loaded in ctx.models.items():
        mine = [c for c in uniq.values() if c.model == name]
        vecs = dict(zip([c.key for c in mine], condition_vectors(mine, ctx.dirs), strict=True))
        todo = [(c, p, i) for c in mine for p, i in units if (c.key, p, i) not in done]
        rank, per_method = {}, Counter()
        for c in mine:  # position of the condition within its method's list
            rank[c.key], per_method[c.method] = per_method[c.method], per_method[c.method] + 1
        todo.sort(key=lambda row: (rank[row[0].key], len(ctx.enc[name][row[1]])))
        gen = ctx.remote.generate_rows if ctx.remote is not None else generate_rows
        n += gen(loaded, ctx.plan.layer, todo, ctx.enc[name], vecs, ctx.scfg, ctx.path,
                 desc="steer" if name == "main" else f"steer ({name})", point=ctx.plan.hook)
    return n


def grade(ctx: Context, rows: Sequence[dict[str, Any]],
          coherence_only: bool = False) -> dict[Row, dict[str, Any]]:
    """Grade generated rows (judge cache in the work folder), by (key, prompt_id, sample)."""
    from latentaudit.judges.base import JudgeCache, JudgeItem
    from latentaudit.steer.grade import grade_rows

    plan = ctx.plan
    prompts = {p.prompt_id: p for p in plan.prompts}
    items = [JudgeItem(prompt=prompts[r["prompt_id"]].prompt, completion=r["completion"],
                       fact=prompts[r["prompt_id"]].meta.get("fact"), prompt_id=r["prompt_id"],
                       sample_index=r["sample_index"],
                       claim=prompts[r["prompt_id"]].meta.get("claim"),
                       system=prompts[r["prompt_id"]].system or plan.cfg.system) for r in rows]
    cache = JudgeCache(plan.work / "judge_cache.jsonl")
    coherence = _judge(ctx, plan.coherence_judge) if plan.coherence_judge else None
    main = coherence if coherence_only and coherence is not None else _judge(ctx, plan.judge)
    graded = grade_rows(rows, items, plan.rubric, main, coherence, cache)
    return {(g["key"], g["prompt_id"], g["sample_index"]): g for g in graded}


def _judge(ctx: Context, spec: str):
    """Build a judge once; a probe for the model under study shares the loaded model."""
    if spec in ctx.judges:
        return ctx.judges[spec]
    from latentaudit.judges import JudgeSpec, make_judge
    from latentaudit.models.embedded import canonical

    plan, loaded = ctx.plan, ctx.models["main"]
    parsed = JudgeSpec.parse(spec, plan.rubric)
    options = dict(plan.judge_options)
    if parsed.backend == "probe":
        from latentaudit.judges.probe import load_probe

        probe = load_probe(parsed.arg or plan.rubric.name)
        if canonical(probe.model) == canonical(loaded.name):
            options = {"model": loaded,
                       "batch_size": options.get("batch_size") or parsed.info.batch_size}
    elif parsed.info.batch_size is None and parsed.backend != "openai":
        options = {}
    ctx.judges[spec] = make_judge(parsed, plan.rubric, **options)
    return ctx.judges[spec]
