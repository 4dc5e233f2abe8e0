"""The run's answer: which latents cause the behaviour, how sure, and where the evidence disagrees.

Pure functions on the run's own numbers (plain dicts, no I/O, no torch); the section loader
(:mod:`latentaudit.report.sections.findings`) reads the files and writes ``findings.json``.

Every piece of evidence about a latent says which way it points: +1 (the latent drives the
behaviour), −1 (it opposes it) or 0 (undecided).

- first-order Δ (the run's Δ-attribution) and exact Δ (explain's mean-ablation check): their
  sign (positive = the latent supports the behaviour-showing completions).
- steering away (negative α), for the paired change of the behaviour rate and for the
  first-token log-odds change: +1 when its 95% interval lies below 0, −1 when above 0.
- steering toward (positive α): +1 when its interval lies above 0, −1 when below 0.

Rules (constants below):

1. Per latent steered alone with sampling (its headline condition per direction and model: the
   searched strength, else the largest), except the random latents (the null: "control"):

   - *supported*: some condition's paired-change interval excludes 0 in the intended direction
     and the change is beyond the random latents' band; no condition points the other way; the
     first-token log-odds and the exact Δ, where measured, do not point the other way.
   - *contradicted*: some condition's interval excludes 0 against the intended direction, its
     change lies past the random latents' band on that side too (random latents can move the
     behaviour the other way as well: a band below 0 toward), and none supports it.
   - *inconclusive* otherwise, with the reason: the directions disagree, a check points the
     other way, the change stays within the random band (either way), or the interval
     includes 0 (with "too few decided pairs" below :data:`MIN_PAIRS`).

2. Power of one condition: the smallest paired change it could detect (two-sided 5%, 80%
   power) is max(:data:`Z_POWER` × SE, z²/(n + z²)) with SE = (hi − lo) / 3.92 from its
   interval and n its decided pairs; the second term is the change whose flips, all one way,
   would sit z standard errors from 0 (a [0, 0] interval does not mean infinite power).
3. Per method and condition (direction, strength, model): the mean over its latents of the
   change in the intended direction (−change away, +change toward), against the random latents
   and against Δ-activation (Δ-attribution also against model diffing, when the sweep ran it):
   the difference of means with SE = √(s²_A/n_A + s²_B/n_B) over
   latents; *beat* when difference / SE > 1.96, *worse* when < −1.96, else *no clear
   difference*, with the smallest detectable difference :data:`Z_POWER` × SE.
4. Trust in the first-order Δ: Spearman ρ of first-order against exact Δ per layer with a
   Fisher-z 95% interval (SE = √(1.06 / (n − 3)), Fieller et al. 1957) over its n latents; a
   warning below :data:`MIN_RHO_LATENTS` latents or :data:`MIN_RHO_PAIRS` pairs.
5. Disagreements: every two pieces of evidence on one latent that point opposite ways. First-
   order against exact Δ compares the first-order Δ of the exactness sample (the same pairs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
MIN_PAIRS = 20
"""Decided pairs below which an inconclusive condition is put down to too few pairs."""
Z_POWER = 2.8
"""z of a two-sided 5% test at 80% power (1.96 + 0.84)."""
Z_TEST = 1.96
MIN_RHO_LATENTS = 20
MIN_RHO_PAIRS = 5
INTENDED = {"away": -1, "toward": 1}
CONTROL = "random"
NAMES = {"first_order": "first-order Δ", "exact": "exact Δ", "steer": "steering",
         "logodds": "first-token log-odds"}


@dataclass
class Inputs:
    """What the findings are computed from (see :mod:`latentaudit.report.sections.findings`)."""

    behaviour: str | None = None
    """One plain sentence naming the behaviour (from the rubric)."""
    steer_layer: int | None = None
    first_order: dict[tuple[int, int], float] = field(default_factory=dict)
    """(layer, latent) → the run's Δ-attribution."""
    exact: dict[int, dict[str, Any]] = field(default_factory=dict)
    """layer → explain's exact.json entry (latents, exact_delta, first_order_delta, pairs,
    spearman)."""
    steering: list[dict[str, Any]] = field(default_factory=list)
    """Rows of steering.jsonl."""
    logodds: list[dict[str, Any]] = field(default_factory=list)
    """Rows of steering_logodds.jsonl."""
    sets: dict[str, list[int]] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    """Rows of steering_summary.json's ``summary`` (per method and condition)."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_finite, ci)):
        return float(ci[0]), float(ci[1])
    return None


def sign_of_value(x: Any) -> int:
    """+1 / −1 / 0 of a Δ (0 for none)."""
    return 0 if not _finite(x) or x == 0 else (1 if x > 0 else -1)


def sign_of_change(ci: Any, direction: str) -> int:
    """Which way a steering change's interval points about the latent (module docstring)."""
    iv = _interval(ci)
    if iv is None or direction not in INTENDED:
        return 0
    side = 1 if iv[0] > 0 else (-1 if iv[1] < 0 else 0)
    return side * INTENDED[direction]


def detectable(ci: Any, n: Any) -> float | None:
    """Rule 2: the smallest paired change a condition could detect (None without n)."""
    if not _finite(n) or n <= 0:
        return None
    floor = Z_POWER ** 2 / (n + Z_POWER ** 2)
    iv = _interval(ci)
    return max(floor, Z_POWER * (iv[1] - iv[0]) / 3.92) if iv else floor


def headlines(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (direction, model): the searched strength, else the largest, with a change."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r.get("diff") is None:
            continue
        k = (r["direction"], r.get("model", "main"))
        rank = (bool(r.get("searched")), r["strength"])
        if k not in best or rank > (bool(best[k].get("searched")), best[k]["strength"]):
            best[k] = r
    return [best[k] for k in sorted(best)]


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _ci_pp(ci: Any) -> str:
    iv = _interval(ci)
    return f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]" if iv else "[–]"


def _num(x: Any) -> str:
    return f"{x:+.3g}" if _finite(x) else "–"


def _ci_num(ci: Any) -> str:
    iv = _interval(ci)
    return f"[{iv[0]:+.3g}, {iv[1]:+.3g}]" if iv else "[–]"


def _cond(r: dict[str, Any]) -> str:
    model = r.get("model", "main")
    return f"steering {r['direction']} at {r['strength']:g}" + \
        ("" if model == "main" else f" on the {model} model")


def evidence(key: tuple[int, int], inputs: Inputs) -> list[dict[str, Any]]:
    """Every piece of evidence on one latent: {kind, label, value, ci, sign, text}."""
    L, i = key
    out = []
    if key in inputs.first_order:
        v = inputs.first_order[key]
        out.append({"kind": "first_order", "label": "first-order Δ", "value": v, "ci": None,
                    "sign": sign_of_value(v), "text": f"first-order Δ {_num(v)}"})
    ex = inputs.exact.get(L) or {}
    if i in (ex.get("latents") or []):
        c = ex["latents"].index(i)
        v, fo = ex["exact_delta"][c], ex["first_order_delta"][c]
        out.append({"kind": "exact", "label": "exact Δ", "value": v, "ci": None,
                    "first_order": fo, "sign": sign_of_value(v),
                    "text": f"exact Δ {_num(v)} (first-order {_num(fo)} on the same pairs)"})
    if L == inputs.steer_layer:
        mine = [r for r in inputs.steering if r.get("latents") == [i]]
        for r in headlines(mine):
            out.append({"kind": "steer", "label": _cond(r), "value": r["diff"],
                        "ci": r.get("diff_ci"), "row": r,
                        "sign": sign_of_change(r.get("diff_ci"), r["direction"]),
                        "text": f"{_cond(r)}: {_pp(r['diff'])} {_ci_pp(r.get('diff_ci'))}"})
        for r in inputs.logodds:
            if r.get("latents") == [i] and _finite(r.get("change")):
                out.append({"kind": "logodds", "label": f"log-odds, {_cond(r)}",
                            "value": r["change"], "ci": r.get("ci"),
                            "sign": sign_of_change(r.get("ci"), r["direction"]),
                            "text": f"first-token log-odds, {_cond(r)}: {_num(r['change'])} "
                                    f"{_ci_num(r.get('ci'))}"})
    return out


def disagreements(ev: list[dict[str, Any]]) -> list[str]:
    """Rule 5: one sentence per two pieces of evidence that point opposite ways."""
    out = []
    for a_n, a in enumerate(ev):
        for b in ev[a_n + 1:]:
            sa, sb = a["sign"], b["sign"]
            if {a["kind"], b["kind"]} == {"first_order", "exact"}:
                e = a if a["kind"] == "exact" else b
                sa, sb = sign_of_value(e["first_order"]), e["sign"]
                if sa and sb and sa != sb:
                    out.append(f"first-order Δ {_num(e['first_order'])} and exact Δ "
                               f"{_num(e['value'])} on the same pairs have opposite signs")
                continue
            if sa and sb and sa != sb:
                out.append(f"{a['text']} {_says(sa)}, but {b['text']} {_says(sb)}")
    return out


def _says(sign: int) -> str:
    return "says it drives the behaviour" if sign > 0 else "says it opposes the behaviour"


def verdict(ev: list[dict[str, Any]], method: str) -> tuple[str, str]:
    """Rule 1: (verdict, reason) of a latent from its evidence."""
    if method == CONTROL:
        return "control", "a random latent: part of the null band, no claim to test"
    steer = [e for e in ev if e["kind"] == "steer"]
    if not steer:
        return "inconclusive", "not steered with sampling"
    support = [e for e in steer if e["sign"] > 0 and e["row"].get("beyond_null")]
    against = [e for e in steer if e["sign"] < 0 and past_band_against(e["row"])]
    if support and against:
        return "inconclusive", (f"the conditions disagree: {support[0]['text']} but "
                                f"{against[0]['text']}")
    if against:
        band = " past the random band" if against[0]["row"].get("null_band") else ""
        return "contradicted", f"{against[0]['text']}: the behaviour moved the other way{band}"
    if support:
        checks = [e for e in ev if e["kind"] in ("logodds", "exact") and e["sign"] < 0]
        if checks:
            return "inconclusive", (f"{support[0]['text']} supports it, but {checks[0]['text']} "
                                    "points the other way")
        missing = [NAMES[k] for k in ("logodds", "exact") if not any(e["kind"] == k
                                                                   for e in ev)]
        return "supported", support[0]["text"] + (
            f" (beyond the random band); not measured: {', '.join(missing)}" if missing
            else " (beyond the random band); the other checks agree or are undecided")
    return "inconclusive", _weak(steer)


def past_band_against(r: dict[str, Any]) -> bool:
    """Whether a steering row's change lies past the random band's end against its intended
    direction (above the band away, below it toward); True when there is no band."""
    band = r.get("null_band")
    if not band or not _finite(r.get("diff")):
        return True
    return r["diff"] > band[1] if r["direction"] == "away" else r["diff"] < band[0]


def _weak(steer: list[dict[str, Any]]) -> str:
    """Why no condition decides: within the band, or an interval that includes 0."""
    e = max(steer, key=lambda e: e["sign"])
    r = e["row"]
    n = r.get("n_paired")
    least = detectable(r.get("diff_ci"), n)
    power = f"; the smallest change it could detect is about {100 * least:.0f} pp" \
        if least is not None else ""
    if e["sign"] != 0:
        other = "" if e["sign"] > 0 else " the other way, as random latents move it too,"
        return (f"{e['text']}{other} is within the random latents' band "
                f"{_ci_pp(r.get('null_band'))}{power}")
    if _finite(n) and n < MIN_PAIRS:
        return f"too few decided pairs ({n}): {e['text']} includes 0{power}"
    return f"{e['text']} includes 0 ({n} decided pairs){power}"


def methods_of(inputs: Inputs) -> dict[int, str]:
    """latent → the first selection method that steered it."""
    out: dict[int, str] = {}
    for method, ids in inputs.sets.items():
        for i in ids or []:
            out.setdefault(i, method)
    for r in inputs.steering:
        if len(r.get("latents") or []) == 1:
            out.setdefault(r["latents"][0], r.get("method", "?"))
    return out


def latent_findings(inputs: Inputs) -> list[dict[str, Any]]:
    """Rules 1 and 5 for every latent with evidence beyond its first-order Δ."""
    keys = {(L, i) for L, e in inputs.exact.items() for i in e.get("latents") or []}
    if inputs.steer_layer is not None:
        keys |= {(inputs.steer_layer, r["latents"][0])
                 for r in inputs.steering + inputs.logodds if len(r.get("latents") or []) == 1}
    method = methods_of(inputs)
    out = []
    for key in sorted(keys):
        ev = evidence(key, inputs)
        steered = any(e["kind"] == "steer" for e in ev)
        m = method.get(key[1]) if key[0] == inputs.steer_layer else None
        v, reason = verdict(ev, m or "") if steered else (None, None)
        out.append({"layer": key[0], "latent": key[1], "method": m, "verdict": v,
                    "reason": reason, "evidence": [e["text"] for e in ev],
                    "disagreements": disagreements(ev)})
    order = {"supported": 0, "contradicted": 1, "inconclusive": 2, "control": 3, None: 4}
    out.sort(key=lambda f: (order[f["verdict"]], -len(f["disagreements"])))
    return out


def _mean_var(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else None
    return m, var


def compare(a: list[float], b: list[float]) -> dict[str, Any]:
    """Rule 3 on the intended-direction changes of two methods' latents."""
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    out = {"mean": ma, "baseline_mean": mb, "difference": ma - mb, "n": len(a),
           "baseline_n": len(b), "se": None, "detectable": None, "result": "cannot tell",
           "why": "fewer than 2 latents in a method"}
    if va is None or vb is None:
        return out
    se = math.sqrt(va / len(a) + vb / len(b))
    out.update(se=se, detectable=Z_POWER * se, why="")
    if se == 0:
        out["result"] = "no clear difference" if ma == mb else (
            "beat" if ma > mb else "worse")
    else:
        z = (ma - mb) / se
        out["result"] = "beat" if z > Z_TEST else ("worse" if z < -Z_TEST else
                                                    "no clear difference")
    return out


def method_findings(inputs: Inputs) -> list[dict[str, Any]]:
    """Rule 3 per condition: each method against random and Δ-activation, and Δ-attribution
    against model diffing when the sweep ran it."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in inputs.steering:
        if len(r.get("latents") or []) == 1 and _finite(r.get("diff")) and \
                r.get("direction") in INTENDED:
            k = (r["direction"], r["strength"], r.get("model", "main"))
            groups.setdefault(k, {}).setdefault(r.get("method", "?"), []).append(r)
    out = []
    for (direction, strength, model), by in sorted(groups.items(), key=str):
        eff = {m: [INTENDED[direction] * r["diff"] for r in rows] for m, rows in by.items()}
        for m in by:
            if m == CONTROL:
                continue
            for base in (CONTROL, "activation", "model-diff"):
                if base == m or base not in by or (base == "model-diff" and m != "attribution"):
                    continue
                c = compare(eff[m], eff[base])
                c.update(method=m, baseline=base, direction=direction, strength=strength,
                         model=model, beyond=sum(bool(r.get("beyond_null")) for r in by[m]),
                         baseline_beyond=sum(bool(r.get("beyond_null")) for r in by[base]))
                c["sentence"] = _method_sentence(c)
                out.append(c)
    return out


def _method_sentence(c: dict[str, Any]) -> str:
    cond = f"steering {c['direction']} at {c['strength']:g}" + \
        ("" if c["model"] == "main" else f" on the {c['model']} model")
    head = (f"{c['method']} vs {c['baseline']}, {cond}: mean change in the intended direction "
            f"{100 * c['mean']:+.1f} pp ({c['n']} latents, {c['beyond']} beyond the random "
            f"band) against {100 * c['baseline_mean']:+.1f} pp ({c['baseline_n']} latents, "
            f"{c['baseline_beyond']} beyond)")
    if c["result"] == "cannot tell":
        return f"{head}: cannot tell ({c['why']})."
    verb = {"beat": "beat it", "worse": "did worse",
            "no clear difference": "no clear difference"}[c["result"]]
    return (f"{head}: {verb}; the smallest difference this run could detect is about "
            f"{100 * c['detectable']:.0f} pp.")


def set_disagreements(inputs: Inputs) -> list[str]:
    """Rule 5 for whole latent sets: a method's mean first-token log-odds change whose interval
    points against the intended direction."""
    out = []
    for r in inputs.summary:
        ci, d = r.get("mean_logodds_change_ci"), r.get("direction")
        if r.get("method") == CONTROL or sign_of_change(ci, d) >= 0:
            continue
        out.append(f"the {r.get('method')} set's mean first-token log-odds change, {_cond(r)}: "
                   f"{_num(r.get('mean_logodds_change'))} {_ci_num(ci)}, against the intended "
                   "direction")
    return out


def rho_interval(rho: float, n: int) -> tuple[float, float] | None:
    """Rule 4: the Fisher-z 95% interval of a Spearman ρ over n latents (None for n ≤ 3, and at
    ρ = ±1, where the transform has no interval to give)."""
    if not _finite(rho) or n <= 3 or abs(rho) >= 1 - 1e-9:
        return None
    z, se = math.atanh(rho), math.sqrt(1.06 / (n - 3))
    return math.tanh(z - Z_TEST * se), math.tanh(z + Z_TEST * se)


def trust(inputs: Inputs) -> list[dict[str, Any]]:
    """Rule 4 per layer of the exactness check."""
    out = []
    for L, e in sorted(inputs.exact.items()):
        n = len(e.get("latents") or [])
        pairs = e.get("pairs")
        pairs = len(pairs) if isinstance(pairs, list) else int(pairs or 0)
        rho = e.get("spearman")
        flips = sum(1 for x, y in zip(e.get("exact_delta") or [], e.get("first_order_delta")
                                      or [], strict=False)
                    if sign_of_value(x) * sign_of_value(y) < 0)
        warn = []
        if n < MIN_RHO_LATENTS:
            warn.append(f"only {n} latents (fewer than {MIN_RHO_LATENTS})")
        if pairs < MIN_RHO_PAIRS:
            warn.append(f"only {pairs} pairs (fewer than {MIN_RHO_PAIRS})")
        out.append({"layer": L, "rho": rho if _finite(rho) else None, "latents": n,
                    "pairs": pairs, "ci": rho_interval(rho, n), "sign_flips": flips,
                    "warning": ("ρ rests on " + " and ".join(warn) + ": read it as a rough "
                                "indication") if warn else None})
    return out


def findings(inputs: Inputs) -> dict[str, Any]:
    """The content of ``findings.json``."""
    lat = latent_findings(inputs)
    counts = {v: sum(f["verdict"] == v for f in lat)
              for v in ("supported", "contradicted", "inconclusive", "control")}
    return {"schema_version": SCHEMA_VERSION, "behaviour": inputs.behaviour,
            "verdicts": counts, "latents": lat, "methods": method_findings(inputs),
            "trust": trust(inputs), "set_disagreements": set_disagreements(inputs),
            "disagreements": sum(len(f["disagreements"]) for f in lat)
            + len(set_disagreements(inputs)),
            "rules": RULES}


RULES = [
    "supported: a steering condition's 95% interval excludes 0 in the intended direction and "
    "the change is beyond the random latents' band, and no steering, first-token or exact-Δ "
    "evidence points the other way",
    "contradicted: a steering condition's interval excludes 0 against the intended direction "
    "and its change lies past the random latents' band on that side, and none supports the "
    "latent",
    "inconclusive: anything else, with the reason",
    f"power: the smallest detectable change is {Z_POWER} standard errors (5% two-sided, 80% "
    "power)",
    "a method beat another when the difference of its latents' mean change exceeds 1.96 "
    "standard errors",
]

