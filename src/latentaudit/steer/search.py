"""Per-latent strength search (Wang et al. 2025): the strongest steering that stays coherent.

For each steered latent set and direction, every strength of the ladder is tried on the first
``search_n`` units (prompt, sample) of the sweep. Incoherence at a strength = the share of those
completions the coherence judge scores incoherent. The search keeps the largest strength whose
incoherence ≤ ``max_incoherence``, else the smallest of the ladder (reported as such). The
trial completions are the first units of the final condition at the strength kept (same seeds),
so they are not generated twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from latentaudit.steer.config import Condition
from latentaudit.steer.generation import Context, generate_missing, grade, read_rows

log = logging.getLogger(__name__)


def incoherence(grades: Sequence[dict | None]) -> float | None:
    """Share of graded completions marked incoherent (None when none was scored)."""
    flags = [g["incoherent"] for g in grades if g is not None and g["incoherent"] is not None]
    return sum(flags) / len(flags) if flags else None


def pick_strength(by_strength: dict[float, float | None], max_incoherence: float) -> float:
    """The largest strength whose incoherence is known and ≤ the limit, else the smallest."""
    ok = [s for s, inc in by_strength.items() if inc is not None and inc <= max_incoherence]
    return max(ok) if ok else min(by_strength)


def search_strengths(ctx: Context, conds: Sequence[Condition],
                     units: Sequence[tuple[str, int]]) -> list[Condition]:
    """Replace each arm's strength ladder by the one strength the search keeps."""
    cfg = ctx.plan.cfg
    trial = list(units[:cfg.search_n])
    steered = [c for c in conds if c.method != "base"]
    generate_missing(ctx, steered, trial)
    rows = read_rows(ctx.path)
    keys = {c.key for c in steered}
    graded = grade(ctx, [rows[(k, p, i)] for k in keys for p, i in trial], coherence_only=True)
    arms: dict[tuple, list[Condition]] = {}
    for c in steered:
        arms.setdefault((c.method, c.latents, c.direction, c.model), []).append(c)
    out = [c for c in conds if c.method == "base"]
    for cs in arms.values():
        inc = {c.strength: incoherence([graded.get((c.key, p, i)) for p, i in trial])
               for c in cs}
        best = pick_strength(inc, cfg.max_incoherence)
        chosen = next(c for c in cs if c.strength == best)
        if inc[best] is None or inc[best] > cfg.max_incoherence:
            log.info("%s: no strength kept incoherence ≤ %.0f%%; using the smallest, %g",
                     chosen.id, 100 * cfg.max_incoherence, best)
        out.append(dataclasses.replace(chosen, extra={
            "searched": True, "incoherence_by_strength": {f"{s:g}": v for s, v in inc.items()}}))
    return out
