"""Latents that rank high for several behaviours: the same model and SAE, several attribution runs.

1. Read each run folder and check that they share the model and, layer by layer, the SAE file.
2. Take the top ``top_k`` latents of every layer of every run (its ranking.jsonl).
3. Keep the latents in the top of at least ``min_runs`` runs; show each one's rank and
   Δ-attribution in every run side by side (rank None where it is outside that run's top),
   most shared first, then by mean rank over the runs where it is in the top.
4. For every pair of runs and every layer they share, the overlap of their top-K lists at
   K = 1, 10, 100 against the overlap two unrelated rankings would give
   (:mod:`~latentaudit.explain.overlap`).

Runs of a fine-tuned model and of its base model compare: they read one SAE (a LoRA adapter's
run records its base model, and that is the model compared).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from latentaudit.errors import LatentAuditError
from latentaudit.explain.overlap import topk_overlap
from latentaudit.runfolder import RunFolder

SCHEMA_VERSION = 1
OVERLAP_KS = (1, 10, 100)


def base_model(run: RunFolder) -> str:
    """The model a run's SAE reads: the base model of a LoRA adapter, else the model."""
    from latentaudit.models.embedded import canonical

    adapter = run.manifest["model"].get("adapter") or {}
    return canonical(adapter.get("base") or run.model_name)


def run_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The runs' names on the page: their folders' names, with as many parent folders as it
    takes to tell them apart (``case-one/run`` and ``false-belief/run``)."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def same_sae(a: str | None, b: str | None) -> bool:
    """Whether two runs' recorded SAE paths name one SAE: the same path; the same file where
    both exist here (same bytes: runs made in another checkout); or, where they do not, the same
    shipped SAE (the path below ``saes/shipped/``)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.is_file() and pb.is_file() and _digest(pa) == _digest(pb)
    marker = ("saes", "shipped")

    def shipped(p: Path) -> tuple[str, ...] | None:
        parts = p.parts
        for i in range(len(parts) - 1):
            if parts[i:i + 2] == marker:
                return parts[i + 2:]
        return None

    return shipped(pa) is not None and shipped(pa) == shipped(pb)


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_same_model(runs: Sequence[RunFolder], flag: str = "--across") -> None:
    """Step 1: one model, and the same SAE path at every layer the runs share (errors name
    ``flag``, the option that gave the runs)."""
    first = runs[0]
    for run in runs[1:]:
        if base_model(run) != base_model(first):
            raise LatentAuditError(
                f"{flag}: {run.path} ran on model '{run.model_name}' but {first.path} on "
                f"'{first.model_name}': compare runs of one model (or of its fine-tunes).")
        for L in set(run.layers) & set(first.layers):
            if not same_sae(run.sae_path(L), first.sae_path(L)):
                raise LatentAuditError(
                    f"{flag}: layer {L} of {run.path} used the SAE {run.sae_path(L)} but "
                    f"{first.path} used {first.sae_path(L)}: compare runs of one SAE.")


def shared_latents(runs: Sequence[RunFolder], top_k: int, min_runs: int = 2) -> list[dict]:
    """Steps 2–3 as rows: ``layer``, ``latent``, ``runs_in_top``, ``ranks`` and
    ``delta_attribution`` (one entry per run, in the order given)."""
    tops = [{(r["layer"], r["latent"]): r["rank"] for r in run.ranking if r["rank"] <= top_k}
            for run in runs]
    keys = sorted({k for top in tops for k in top})
    rows = []
    for layer, latent in keys:
        ranks = [top.get((layer, latent)) for top in tops]
        hits = [r for r in ranks if r is not None]
        if len(hits) < min_runs:
            continue
        deltas = []
        for run in runs:
            t = run.vector("delta_attribution", layer, "pt") if layer in run.layers else None
            deltas.append(None if t is None or latent >= t.numel() else float(t[latent]))
        rows.append({"layer": layer, "latent": latent, "runs_in_top": len(hits),
                     "mean_rank": sum(hits) / len(hits), "ranks": ranks,
                     "delta_attribution": deltas})
    return sorted(rows, key=lambda r: (-r["runs_in_top"], r["mean_rank"], r["layer"],
                                       r["latent"]))


def pair_overlaps(runs: Sequence[RunFolder], ks: Sequence[int] = OVERLAP_KS) -> list[dict]:
    """Step 4: one row per (pair of runs, shared layer, K)."""
    rows = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            for layer in sorted(set(runs[i].layers) & set(runs[j].layers)):
                a = runs[i].delta_attribution(layer)
                b = runs[j].delta_attribution(layer)
                for k in ks:
                    if k > a.numel():
                        continue
                    o = topk_overlap(a, b, k)
                    rows.append({"runs": [i, j], "layer": layer, "k": o.k,
                                 "overlap": o.overlap, "expected": o.expected,
                                 "p_value": o.p_value, "shared": o.shared})
    return rows


def across_runs(runs: Sequence[str | os.PathLike], top_k: int = 20,
                min_runs: int = 2, flag: str = "--across") -> dict:
    """The content of ``across.json`` for several run folders of one model and SAE."""
    if len(runs) < 2:
        raise LatentAuditError(f"{flag} needs at least two run folders.")
    if not 2 <= min_runs <= len(runs):
        raise LatentAuditError(f"--min-runs must be between 2 and the number of runs "
                               f"({len(runs)}), got {min_runs}.")
    folders = [RunFolder.open(r, flag) for r in runs]
    check_same_model(folders, flag)
    return {"schema_version": SCHEMA_VERSION, "runs": [str(r.path) for r in folders],
            "model": folders[0].model_name, "models": [r.model_name for r in folders],
            "top_k": top_k, "min_runs": min_runs,
            "latents": shared_latents(folders, top_k, min_runs),
            "overlap": pair_overlaps(folders)}
