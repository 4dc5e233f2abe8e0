"""Grade steered completions and turn the grades into the sweep's table.

1. Every completion is graded by the sweep's judge through the verdict cache (a rerun is free).
   When that judge does not answer the rubric's ``coherent`` question (a probe reads validation
   only), the coherence judge (the rubric's rules by default) answers it, so incoherence is
   always measured. The rubric's threshold rule then gives positive / negative / excluded.
2. Incoherent: the ``coherent`` score is below :data:`INCOHERENT_BELOW`.
3. Per condition: the behaviour rate and its CI, the unsteered rate of the same units, the paired
   difference (common random numbers: same (prompt, sample) seeds) and its CI, the incoherent
   share, n (:mod:`latentaudit.steer.stats`); then each latent's effect against the random
   latents' null band of the same direction, strength and model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latentaudit.judges.base import Judge, JudgeCache, JudgeItem, grade_all
from latentaudit.judges.rubrics import Rubric
from latentaudit.runfolder import SteeringRow
from latentaudit.steer import stats
from latentaudit.steer.config import Condition, SteerConfig

COHERENCE_QUESTION = "coherent"
INCOHERENT_BELOW = 50.0
OUTCOME_VALUE = {"positive": 1, "negative": 0}


def grade_rows(rows: Sequence[dict[str, Any]], items: Sequence[JudgeItem], rubric: Rubric,
               judge: Judge, coherence: Judge | None, cache: JudgeCache) -> list[dict[str, Any]]:
    """``outcome``, ``why``, ``incoherent`` and ``judge_error`` for every generated row."""
    verdicts = grade_all(judge, items, cache).verdicts
    has_q = any(q.name == COHERENCE_QUESTION for q in rubric.questions)
    need = [i for i, v in enumerate(verdicts)
            if has_q and COHERENCE_QUESTION not in v.answers and not v.error]
    if need and coherence is not None:
        extra = grade_all(coherence, [items[i] for i in need], cache).verdicts
        for i, v in zip(need, extra, strict=True):
            if COHERENCE_QUESTION in v.answers:
                verdicts[i].answers[COHERENCE_QUESTION] = v.answers[COHERENCE_QUESTION]
    out = []
    for row, v in zip(rows, verdicts, strict=True):
        decision = rubric.decide(v.answers, v.error, v.outcome)
        coh = v.answers.get(COHERENCE_QUESTION)
        incoherent = None if coh is None or coh.score is None else coh.score < INCOHERENT_BELOW
        out.append({"key": row["key"], "prompt_id": row["prompt_id"],
                    "sample_index": row["sample_index"], "outcome": decision.outcome,
                    "why": decision.why, "incoherent": incoherent, "judge_error": v.error})
    return out


def condition_table(conditions: Sequence[Condition], graded: dict[tuple[str, str, int], dict],
                    units: Sequence[tuple[str, int]], cfg: SteerConfig,
                    logodds: dict[str, dict] | None = None) -> list[SteeringRow]:
    """One row per steered condition (see the module docstring), the null band filled in."""
    rows = []
    for c in conditions:
        if c.method == "base":
            continue
        mine = [graded.get((c.key, p, s)) for p, s in units]
        base = [graded.get((c.base_id, p, s)) for p, s in units]
        have = [(m, b, p) for m, b, (p, _) in zip(mine, base, units, strict=True)
                if m is not None and b is not None]
        y = [OUTCOME_VALUE.get(m["outcome"]) for m, _, _ in have]
        y0 = [OUTCOME_VALUE.get(b["outcome"]) for _, b, _ in have]
        clusters = [p for _, _, p in have]
        boot = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
        r, r0 = stats.rate(y, clusters, **boot), stats.rate(y0, clusters, **boot)
        d = stats.paired_difference(y, y0, clusters, **boot)
        inc = stats.rate([None if m["incoherent"] is None else int(m["incoherent"])
                          for m, _, _ in have], clusters, **boot)
        lo = (logodds or {}).get(c.key) or {}
        rows.append(SteeringRow(
            method=c.method, latents=list(c.latents), direction=c.direction,
            strength=c.strength, alpha=c.alpha, model=c.model,
            searched=bool(c.extra.get("searched")), n=len(have), n_decided=r.n, rate=r.value,
            rate_ci=[r.lo, r.hi], base_rate=r0.value, base_rate_ci=[r0.lo, r0.hi],
            diff=d.value, diff_ci=[d.lo, d.hi], n_paired=d.n, incoherence=inc.value,
            incoherence_ci=[inc.lo, inc.hi], logodds_change=lo.get("change"),
            logodds_change_ci=lo.get("ci")))
    _mark_null_band(rows)
    return rows


def _group(row: SteeringRow) -> tuple:
    """Rows compared with one null band: searched strengths differ per latent, so a search
    groups all its strengths."""
    strength = None if row.searched else row.strength
    return (row.direction, strength, row.model, row.searched)


def _mark_null_band(rows: list[SteeringRow]) -> None:
    bands: dict[tuple, tuple[float, float] | None] = {}
    for g in {_group(r) for r in rows}:
        bands[g] = stats.null_band([r.diff for r in rows if _group(r) == g
                                    and r.method == "random" and len(r.latents) == 1])
    for r in rows:
        band = bands[_group(r)]
        r.null_band = list(band) if band else None
        r.beyond_null = stats.beyond_band(r.diff, band, r.direction)


def summarise(rows: Sequence[SteeringRow], n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> list[dict[str, Any]]:
    """Per method, direction, strength and model: mean effect (bootstrap over the latents) and
    latents beyond the null band."""
    groups: dict[tuple, list[SteeringRow]] = {}
    for r in rows:
        if len(r.latents) == 1:
            groups.setdefault((r.method, *_group(r)), []).append(r)
    out = []
    for (method, direction, strength, model, searched), rs in groups.items():
        diffs = [r.diff for r in rs if r.diff is not None]
        lo = [r.logodds_change for r in rs if r.logodds_change is not None]
        inc = [r.incoherence for r in rs if r.incoherence is not None]
        md = stats.mean_estimate(diffs, n_boot, seed, level)
        ml = stats.mean_estimate(lo, n_boot, seed, level)
        out.append({"method": method, "direction": direction, "strength": strength,
                    "model": model, "searched": searched, "latents": len(rs),
                    "mean_diff": md.value, "mean_diff_ci": [md.lo, md.hi],
                    "beyond_null": sum(r.beyond_null for r in rs),
                    "null_band": rs[0].null_band,
                    "mean_logodds_change": ml.value, "mean_logodds_change_ci": [ml.lo, ml.hi],
                    "mean_incoherence": sum(inc) / len(inc) if inc else None})
    return out
