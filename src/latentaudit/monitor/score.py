"""``monitor score``: apply a monitor file to new completions, streaming.

1. Read the monitor file; refuse it when ``--model``, ``--sae`` or ``--layer`` differ from the
   ones it was fit with (the SAE by the digest of its tensors, not by its path).
2. Check every line of the completions file in one streaming pass (JSON, prompt, completion,
   token ids), keeping only the line numbers and the first problems, before the model loads.
3. Resume: rows already in ``--out`` (a torn last line is cut off) must be this monitor's scores
   of the first rows of the input, in order; scoring goes on after them.
4. Score ``chunk`` rows at a time: read the monitor's latents' reductions
   (:func:`~latentaudit.monitor.read.read_reductions`), p = σ(w·x + b), flag = p ≥ threshold;
   append each input row with a ``monitor`` object (``id``, ``score``, ``flag``, ``line``,
   ``latents``: each latent's mean activation) and fsync. Memory holds one chunk, whatever the
   file's size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._io import complete_lines, iter_json_lines
from latentaudit.errors import LatentAuditError
from latentaudit.monitor.file import Monitor
from latentaudit.options import whole

log = logging.getLogger(__name__)


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line, decoded JSON or the JSONDecodeError) of each non-blank line."""
    return iter_json_lines(path)


def check_file(path: Path) -> list[int]:
    """Line numbers of the rows; one error lists the first 20 problems (file:line)."""
    from latentaudit._io import json_problem
    from latentaudit.judges.run import check_row
    from latentaudit.monitor.read import ids_problem

    if not path.is_file():
        raise LatentAuditError(f"--completions {path}: no such file.")
    lines, errs, n_errs = [], [], 0
    for n, row in iter_rows(path):
        where = f"{path}:{n}"
        if isinstance(row, json.JSONDecodeError):
            problems = [f"{where}: not valid JSON ({json_problem(row)})"]
        else:
            problems = check_row(row, where)
            if not problems:
                problems = [p for p in [ids_problem(row, where)] if p]
            if not problems and not row.get("completion_token_ids") and not row["completion"]:
                problems = [f"{where}: field 'completion' is empty: there is nothing to score"]
        n_errs += len(problems)
        errs += problems[:max(0, 20 - len(errs))]
        lines.append(n)
    if n_errs:
        more = [f"... and {n_errs - len(errs)} more"] if n_errs > len(errs) else []
        raise LatentAuditError(f"{path} has {n_errs} problem(s); fix them and rerun:\n  "
                               + "\n  ".join(errs + more))
    if not lines:
        raise LatentAuditError(f"{path}: the file holds no completions.")
    return lines


def rows_done(out: Path, mon: Monitor, lines: list[int]) -> int:
    """How many leading input rows ``out`` already scores (a torn last line is cut off)."""
    if not out.exists():
        return 0
    done = 0
    for n, text in enumerate(complete_lines(out), start=1):
        if not text.strip():
            continue
        try:
            m = json.loads(text)["monitor"]
            ok = m["id"] == mon.digest() and done < len(lines) and m["line"] == lines[done]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise LatentAuditError(f"{out}:{n}: not this monitor's score of line "
                                   f"{lines[done] if done < len(lines) else '(none)'} of the "
                                   "input; choose another --out, or remove the file to start "
                                   "again.")
        done += 1
    return done


def scored_rows(mon: Monitor, rows: list[dict[str, Any]], lines: list[int],
                latent_mean: Float[Tensor, "batch k"],
                latent_max: Float[Tensor, "batch k"]) -> list[dict[str, Any]]:
    """Each input row with its ``monitor`` object."""
    p = mon.probability(mon.features(latent_mean, latent_max))
    ident = mon.digest()
    return [{**row, "monitor": {"id": ident, "score": float(s), "flag": bool(s >= mon.threshold),
                                "line": n, "latents": {str(i): round(float(v), 6) for i, v
                                                       in zip(mon.latents, means, strict=True)}}}
            for row, n, s, means in zip(rows, lines, p.tolist(), latent_mean, strict=True)]


class ScoreSummary(NamedTuple):
    rows: int
    """Rows in the input."""
    scored: int
    """Rows scored by this call (the others were in --out already)."""
    flagged: int
    """Rows flagged by this call."""
    out: Path


def _chunks(path: Path, start: int, chunk: int) -> Iterator[list[tuple[int, dict]]]:
    batch: list[tuple[int, dict]] = []
    for i, (n, row) in enumerate(iter_rows(path)):
        if i < start:
            continue
        batch.append((n, row))
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch


def run_score(monitor, completions, out, *, model: str | None = None, sae: str | None = None,
              layer: int | None = None, chunk: int = 64, batch_size: int = 8,
              device: str = "auto", dtype: str = "float32") -> ScoreSummary:
    """Score ``completions`` into ``out`` (see the module docstring); resumes a killed run."""
    from latentaudit._progress import progress
    from latentaudit.models.load import load_model
    from latentaudit.monitor.file import check_identity, check_model_fits, load_monitor
    from latentaudit.monitor.inputs import load_monitor_sae
    from latentaudit.monitor.read import encode, max_len, read_reductions, to_completion

    whole("chunk", chunk, 1)
    whole("batch_size", batch_size, 1)
    path, out, where = Path(completions), Path(out), f"the monitor {monitor}"
    mon = load_monitor(monitor)
    check_identity(mon, where, model=model, layer=layer)
    model = model or str(mon.model["name"])
    the_sae = load_monitor_sae(sae or str(mon.sae["path"]), model, mon.layer)
    check_identity(mon, where, sae=the_sae)
    lines = check_file(path)
    done = rows_done(out, mon, lines)
    idx = torch.tensor(mon.latents)
    lm = load_model(model, device=device, dtype=dtype)
    check_model_fits(mon, where, lm.d_model, lm.name)
    the_sae.to(lm.device)
    scored = flagged = 0
    with open(out, "a", encoding="utf-8") as f, progress(
            total=len(lines), initial=done, desc="monitor score", unit="completion") as bar:
        for part in _chunks(path, done, chunk):
            comps = [to_completion(row, str(path), n) for n, row in part]
            red = read_reductions(lm, the_sae, mon.layer,
                                  encode(lm.tokenizer, comps, max_len(lm)), idx, batch_size,
                                  desc=None)
            rows = scored_rows(mon, [r for _, r in part], [n for n, _ in part],
                               red.latent_mean, red.latent_max)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            scored += len(rows)
            flagged += sum(r["monitor"]["flag"] for r in rows)
            bar.update(len(rows))
    return ScoreSummary(len(lines), scored, flagged, out)
