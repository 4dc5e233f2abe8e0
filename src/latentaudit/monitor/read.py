"""Reading completions for the monitor: labelled rows in, per-completion reductions out.

1. Rows: a judged file (``latentaudit judge``: ``outcome`` positive / negative / excluded) or a
   behaviour dataset (``label``); excluded rows are left out. Each row becomes a behaviour
   :class:`~latentaudit.data.behaviour.Completion` so it is tokenised exactly as attribution
   tokenises it (:func:`~latentaudit.attribution.plan.encode_completions`: the row's token ids
   when it has them, else the chat template).
2. The model runs up to the SAE's hook point of layer L (resid_post, resid_pre, attn_out or
   mlp_out; :func:`~latentaudit.models.hooks.run_until`, left-padded batches of similar length);
   at the positions holding completion tokens the SAE encodes the activation a_t there into
   latent activations f_t.
3. Per completion C with completion positions T_C:
   mean_i(C) = (1/|T_C|) Σ_{t∈T_C} f_{t,i}, max_i(C) = max_{t∈T_C} f_{t,i}, and the residual's
   mean (1/|T_C|) Σ_t a_t (the linear probe's input).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from latentaudit.data.behaviour import Completion, default_prompt_id
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import pad_id

OUTCOMES = ("positive", "negative", "excluded")


def row_outcome(row: dict[str, Any]) -> str | None:
    """positive / negative / excluded from ``label`` (a dataset) or ``outcome`` (judged)."""
    value = row.get("label", row.get("outcome"))
    return value if value in OUTCOMES else None


def ids_problem(row: dict[str, Any], where: str) -> str | None:
    for key in ("prompt_token_ids", "completion_token_ids"):
        ids = row.get(key)
        if ids is not None and not (isinstance(ids, list) and ids and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            return f"{where}: field '{key}' must be a non-empty list of token ids"
    return None


def to_completion(row: dict[str, Any], source: str, line: int, label: str = "") -> Completion:
    """A checked completions row as a behaviour Completion (``label`` unused for reading)."""
    from latentaudit.judges.run import row_system

    pid = row.get("prompt_id")
    return Completion(prompt=row["prompt"], completion=row["completion"], label=label,
                      prompt_id=str(pid) if pid is not None else default_prompt_id(row["prompt"]),
                      meta=row.get("meta") or {}, prompt_token_ids=row.get("prompt_token_ids"),
                      completion_token_ids=row.get("completion_token_ids"),
                      system=row_system(row), line=line, source=source)


@dataclass
class Labelled:
    """The labelled completions of one file."""

    completions: list[Completion]
    labels: Bool[Tensor, " batch"]
    """True = positive (shows the behaviour)."""
    excluded: int
    path: Path
    sha256: str

    @property
    def groups(self) -> list[str]:
        return [c.prompt_id for c in self.completions]


def read_labelled(path: str | Path, flag: str = "--completions") -> Labelled:
    """Rows with a positive / negative label or outcome; every problem names file:line."""
    from latentaudit._io import sha256_file
    from latentaudit.judges.run import read_completions

    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"{flag} {path}: no such file.")
    rows = read_completions(path)
    errs, kept, excluded = [], [], 0
    for row in rows:
        where = f"{path}:{row['_line']}"
        outcome = row_outcome(row)
        problem = ids_problem(row, where)
        if problem:
            errs.append(problem)
        elif outcome is None:
            errs.append(f"{where}: needs 'outcome' (from `latentaudit judge`) or 'label' "
                        "(a behaviour dataset): positive, negative or excluded")
        elif outcome == "excluded":
            excluded += 1
        else:
            kept.append(to_completion(row, str(path), row["_line"], outcome))
    if errs:
        shown = errs[:20] + ([f"... and {len(errs) - 20} more"] if len(errs) > 20 else [])
        raise LatentAuditError(f"{flag} {path} has {len(errs)} problem(s); fix them and rerun:"
                               "\n  " + "\n  ".join(shown))
    labels = torch.tensor([c.label == "positive" for c in kept], dtype=torch.bool)
    if not kept or labels.all() or not labels.any():
        raise LatentAuditError(
            f"{flag} {path}: {int(labels.sum())} positive and {int((~labels).sum())} negative "
            "completions; measuring or fitting a monitor needs both.")
    return Labelled(kept, labels, excluded, path, sha256_file(path))


class Reductions(NamedTuple):
    """Per-completion reductions over the completion's tokens."""

    latent_mean: Float[Tensor, "batch k"]
    latent_max: Float[Tensor, "batch k"]
    resid_mean: Float[Tensor, "batch d_model"]


def reduce_completions(acts: Float[Tensor, "batch pos d_model"], mask: Bool[Tensor, "batch pos"],
                       sae, latents: Int[Tensor, " k"] | None = None) -> Reductions:
    """Mean and max latent activations, and the mean residual, over the masked positions."""
    B = acts.shape[0]
    rows = mask.nonzero()[:, 0]  # (N,) row of each completion token
    a = acts[mask].float()  # (N, D)
    f = sae.encode(a.to(sae.W_enc.dtype)).float()  # (N, S)
    if latents is not None:
        f = f[:, latents.to(f.device)]  # (N, k)
    count = mask.sum(1).clamp_min(1).float()[:, None]  # (B, 1)
    mean = torch.zeros(B, f.shape[1], device=f.device).index_add_(0, rows, f) / count
    peak = torch.full((B, f.shape[1]), -torch.inf, device=f.device)
    peak = peak.scatter_reduce(0, rows[:, None].expand_as(f), f, "amax")
    resid = torch.zeros(B, a.shape[1], device=a.device).index_add_(0, rows, a) / count
    return Reductions(mean, peak, resid)


@torch.no_grad()
def read_reductions(lm, sae, layer: int, seqs: list[tuple[list[int], list[int]]],
                    latents: Int[Tensor, " k"] | None = None, batch_size: int = 8,
                    desc: str | None = "reading completions") -> Reductions:
    """:func:`reduce_completions` of every (prompt ids, completion ids), in input order, on CPU.

    ``desc``: the progress bar's title; None shows none (the caller shows its own).
    """
    from latentaudit._progress import progress
    from latentaudit.data.tokens import collate, length_batches
    from latentaudit.models.hooks import run_until

    device = lm.device
    pad = pad_id(lm.tokenizer)
    batches = length_batches([len(p) + len(q) for p, q in seqs], batch_size)
    order = [i for idx in batches for i in idx]
    parts: list[Reductions] = []
    with progress(total=len(seqs), desc=desc or "", unit="completion",
                  disable=True if desc is None else None) as bar:
        for idx in batches:
            batch = collate([seqs[i] for i in idx], pad).to(device)
            acts = run_until(lm.model, [layer], input_ids=batch.input_ids,
                             attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids,
                             point=sae.read_point)[layer]  # (B, T, D)
            red = reduce_completions(acts, batch.completion_mask, sae, latents)
            parts.append(Reductions(*(t.cpu() for t in red)))
            bar.update(batch.input_ids.shape[0])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return Reductions(*(torch.cat([getattr(p, name) for p in parts])[inverse]
                        for name in Reductions._fields))


def encode(tokenizer, completions: list[Completion], max_len: int | None
           ) -> list[tuple[list[int], list[int]]]:
    """Token ids as attribution makes them; ids outside the vocabulary name their file:line."""
    from latentaudit.attribution.plan import encode_completions

    seqs = encode_completions(tokenizer, completions, max_len)
    vocab = len(tokenizer)
    for c, (p, q) in zip(completions, seqs, strict=True):
        if max(p + q) >= vocab:
            raise LatentAuditError(f"{c.where}: token id {max(p + q)} is outside the model's "
                                   f"vocabulary ({vocab}); were the ids made by another model?")
    return seqs


def reading_key(model: str, sae_digest: str, layer: int,
                seqs: list[tuple[list[int], list[int]]], hook: str = "resid_post") -> str:
    """What a cached reading must match: model, SAE, layer, hook point and every token
    sequence."""
    where = {"layer": layer} if hook == "resid_post" else {"layer": layer, "hook": hook}
    blob = json.dumps({"model": model, "sae": sae_digest, **where,
                       "seqs": hashlib.sha256(repr(seqs).encode()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(path: Path, key: str) -> Reductions | None:
    """The reductions saved at ``path`` under ``key``, else None."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return Reductions(*(f.get_tensor(n) for n in Reductions._fields))
    except Exception:  # a damaged cache is recomputed
        return None


def save_cached(path: Path, key: str, red: Reductions) -> None:
    from latentaudit._io import save_safetensors

    save_safetensors(path, red._asdict(), metadata={"key": key, "schema_version": "1"})


def read_cached(lm, sae, layer: int, completions: list[Completion], cache: Path | None,
                batch_size: int = 8, desc: str = "reading completions") -> Reductions:
    """Every latent's reductions of ``completions``, from ``cache`` when it matches (model,
    SAE, layer and token ids), else read and saved there."""
    from latentaudit.monitor.file import sae_digest

    seqs = encode(lm.tokenizer, completions, max_len(lm))
    key = reading_key(lm.name, sae_digest(sae), layer, seqs, sae.info.hook)
    if cache is not None and (red := load_cached(cache, key)) is not None:
        return red
    red = read_reductions(lm, sae, layer, seqs, None, batch_size, desc)
    if cache is not None:
        save_cached(cache, key, red)
    return red


def max_len(lm) -> int | None:
    n = getattr(lm.model.config, "max_position_embeddings", None)
    return n if isinstance(n, int) else None
