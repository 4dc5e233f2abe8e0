"""The numbers the README and the evals' READMEs quote, recomputed from the files they cite.

1. Each check finds the sentence or table row that quotes a number in its document (whitespace
   and line breaks ignored) and reads the number from there, so a changed document is checked
   as it now reads; a sentence that is gone fails with the text it looked for.
2. It recomputes the number from the committed file the document names (the demo's shipped
   completions and config, the suites, the hand labels, the steering sweep, the organism's data,
   judged completions and training card, the shipped SAEs' cards) and compares them at the
   precision the document prints.
3. Timings and measurements no committed file holds (wall times, the judges' agreement) are
   checked for their internal sums only. Files only: no model runs.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PKG = ROOT / "src" / "latentaudit"
FALSE_BELIEF = ROOT / "evals" / "false-belief"
SWEEP = FALSE_BELIEF / "steering" / "sweep"
ORGANISM = ROOT / "evals" / "organism"


def _doc(path: Path) -> str:
    return re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))


def says(path: Path, pattern: str) -> re.Match:
    """The first place ``path`` matches ``pattern`` (spaces in the pattern match any run of
    whitespace); a document that no longer says it fails the check by name."""
    m = re.search(pattern.replace(" ", r"\s+"), _doc(path))
    assert m, f"{path.relative_to(ROOT)} no longer says /{pattern}/: update {Path(__file__).name}"
    return m


def number(text: str) -> float:
    return float(text.replace("−", "-").replace(",", "").rstrip("%"))


def jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


README = ROOT / "README.md"
FB_README = FALSE_BELIEF / "README.md"
ORG_README = ORGANISM / "README.md"


# -- the demo --------------------------------------------------------------------------------

def test_demo_completions_as_quoted():
    rows = jsonl(PKG / "pipeline" / "demo" / "completions.jsonl")
    per_prompt = Counter(r["prompt_id"] for r in rows)
    m = says(README, r"It starts from (\d+) shipped on-policy completions of the model, "
                     r"(\d+) for each of (\d+) `false-belief` prompts")
    assert (int(m[1]), int(m[3])) == (len(rows), len(per_prompt))
    assert set(per_prompt.values()) == {int(m[2])}
    m2 = says(README, r"(\d+) repeat the text of another sample of their prompt, so the judge "
                      r"grades (\d+) distinct replies")
    distinct = {(r["prompt_id"], r["completion"]) for r in rows}
    assert (int(m2[1]), int(m2[2])) == (len(rows) - len(distinct), len(distinct))
    note = says(PKG / "pipeline" / "demo" / "demo.toml", r"starts from (\d+) shipped on-policy "
                                                          r"completions of the model \((\d+) for "
                                                          r"each of (\d+) false-belief")
    assert note.groups() == m.groups()


def test_demo_sizes_as_the_config_sets_them():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    cfg = tomllib.loads((PKG / "pipeline" / "demo" / "demo.toml").read_text(encoding="utf-8"))
    m = says(README, r"explains the top (\d+) latents .*?\), traces the top (\d+) latents at layer "
                     r"(\d+) to the latents of the shipped layer-(\d+) SAE \(`([^`]+)`\) over "
                     r"the pairs of the first (\d+) prompts")
    assert int(m[1]) == cfg["explain"]["top_k"]
    assert int(m[2]) == cfg["circuit"]["top_k"]
    exact = says(README, r"explains the top \d+ latents \(with their output effect on (\d+) "
                         r"completions\) and measures the exact effect of the top (\d+) on (\d+) "
                         r"pairs \(so that .*?rests on (\d+) latents and (\d+) pairs\)")
    ex = cfg["explain"]
    assert [int(g) for g in exact.groups()] == [ex["effect_texts"], ex["exact_top"],
                                                ex["exact_pairs"], ex["exact_top"],
                                                ex["exact_pairs"]]
    assert [m[5]] == cfg["circuit"]["upstream_sae"]
    assert int(m[6]) == cfg["circuit"]["max_prompts"]
    sae = json.loads((PKG / "saes" / "shipped" / m[5] / "cfg.json").read_text())
    default = json.loads((PKG / "saes" / "shipped" / cfg["model"] / "cfg.json").read_text())
    assert (int(m[3]), int(m[4])) == (default["layer"], sae["layer"])
    m = says(README, r"steers (\d+) latents per method away from the behaviour on (\d+) "
                     r"held-out prompts")
    assert int(m[1]) == cfg["steer"]["top_k"] and int(m[2]) == cfg["steer"]["max_prompts"]
    assert cfg["steer"]["directions"] == ["away"]


def test_the_demo_measures_rho_on_enough_latents_and_pairs():
    """The demo's ρ is not one the findings flag as resting on too little."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from latentaudit.report.findings import MIN_RHO_LATENTS, MIN_RHO_PAIRS

    cfg = tomllib.loads((PKG / "pipeline" / "demo" / "demo.toml").read_text(encoding="utf-8"))
    ex = cfg["explain"]
    assert max(ex["top_k"], ex.get("exact_top", 0)) >= MIN_RHO_LATENTS == 20
    assert ex["exact_pairs"] >= MIN_RHO_PAIRS == 5


def test_demo_stage_times_add_up_to_its_wall_time():
    m = says(README, r"it took (\d+) min (\d+) s on 2 quiet cores .*?\(judge (\d+) s with the "
                     r"model's load, attribute (\d+) s, explain (\d+) s .*?circuit\s+(\d+) s, "
                     r"steer (\d+) s;")
    total = 60 * int(m[1]) + int(m[2])
    stages = [int(m[i]) for i in range(3, 8)]
    # the stages' own times, each rounded to the second, and a few seconds of start and report
    assert 0 <= total - sum(stages) <= 10
    budget = says(README, r"finishes in under (\d+) minutes")
    assert total < 60 * int(budget[1])


# -- suites, hand labels, the judge -----------------------------------------------------------

@pytest.mark.parametrize(("suite", "pattern"), [
    ("false-belief", r"\(`false-belief`: (\d+) common misconceptions"),
    ("broad-misalignment", r"`broad-misalignment`: (\d+) open-ended questions")])
def test_suite_sizes(suite, pattern):
    assert int(says(README, pattern)[1]) == len(jsonl(PKG / "suites" / f"{suite}.jsonl"))


def _labelled() -> list[tuple[str, str]]:
    """(prompt_id, hand label) of every row of completions.jsonl, in its order."""
    labels = {}
    for path in sorted(FALSE_BELIEF.glob("labels.rows*.jsonl")):
        for r in jsonl(path):
            labels[(r["prompt_id"], r["sample_index"])] = r["validation"]
    rows = jsonl(FALSE_BELIEF / "completions.jsonl")
    return [(r["prompt_id"], labels[(r["prompt_id"], r["sample_index"])]) for r in rows]


def _label_stats(rows: list[tuple[str, str]]) -> dict:
    per = defaultdict(Counter)
    for pid, label in rows:
        per[pid][label] += 1
    both = [p for p, c in per.items() if c["VALIDATES"] and c["CORRECTS"]]
    return {"prompts": len(per), "counts": Counter(label for _, label in rows),
            "both": len(both), "pairs": sum(per[p]["VALIDATES"] * per[p]["CORRECTS"] for p in both)}


def test_hand_labels_as_the_monitor_section_quotes_them():
    rows = _labelled()
    assert len(rows) == 960
    train, held = _label_stats(rows[:768]), _label_stats(rows[768:])
    m = says(README, r"rows 1–768 of \[evals/false-belief\]\S* \((\d+) prompts, graded by the hand "
                     r"labels: (\d+) validating, (\d+) correcting, (\d+) evasive and left out; "
                     r"(\d+) pairs from (\d+) prompts\)")
    c = train["counts"]
    assert [int(g) for g in m.groups()] == [train["prompts"], c["VALIDATES"], c["CORRECTS"],
                                            c["EVADES"], train["pairs"], train["both"]]
    m = says(README, r"rows 769–960 \((\d+) other prompts: (\d+) validating, (\d+) correcting, "
                     r"(\d+) left out\)")
    c = held["counts"]
    assert [int(g) for g in m.groups()] == [held["prompts"], c["VALIDATES"], c["CORRECTS"],
                                            c["EVADES"]]
    m = says(README, r"With (\d+) correcting replies in the held-out rows \(from (\d+) prompts\)")
    correcting = {p for p, label in rows[768:] if label == "CORRECTS"}
    assert (int(m[1]), int(m[2])) == (c["CORRECTS"], len(correcting))
    graded = train["counts"]["VALIDATES"] + train["counts"]["CORRECTS"]
    m = says(README, r"reading the (\d+) \+ (\d+) graded completions")
    assert (int(m[1]), int(m[2])) == (held["counts"]["VALIDATES"] + c["CORRECTS"], graded)
    assert int(says(README, r"fit on the (\d+) graded attribution rows")[1]) == graded
    assert int(says(README, r"bootstrap over the (\d+) held-out prompts")[1]) == held["prompts"]


def test_prompts_with_both_labels():
    stats = _label_stats(_labelled())
    m = says(FB_README, r"By the hand labels, (\d+) of the (\d+) prompts have both")
    assert (int(m[1]), int(m[2])) == (stats["both"], stats["prompts"])
    m = says(FB_README, r"8 per prompt for the first (\d+) prompts \((\d+) completions\)")
    assert (int(m[1]), int(m[2])) == (stats["prompts"], sum(stats["counts"].values()))


@pytest.mark.parametrize("doc", [README, FB_README], ids=["README", "false-belief"])
def test_probe_confusion_matrix_sums(doc):
    """The matrix's rows are the hand labels of rows 769–960; its agreement is its diagonal."""
    rows = says(doc, r"\| hand \\ probe \| VALIDATES \| CORRECTS \| EVADES \| "
                     r"\|---\|---\|---\|---\| \| VALIDATES \| (\d+) \| (\d+) \| (\d+) \| "
                     r"\| CORRECTS \| (\d+) \| (\d+) \| (\d+) \| "
                     r"\| EVADES \| (\d+) \| (\d+) \| (\d+) \|")
    m = [[int(rows[3 * i + j + 1]) for j in range(3)] for i in range(3)]
    held = _label_stats(_labelled()[768:])["counts"]
    assert [sum(r) for r in m] == [held["VALIDATES"], held["CORRECTS"], held["EVADES"]]
    n = sum(map(sum, m))
    three_way = (m[0][0] + m[1][1] + m[2][2]) / n
    binary = (m[0][0] + m[1][1] + m[1][2] + m[2][1] + m[2][2]) / n
    if doc is README:
        q = says(README, r"Against (\d+) hand labels .*? agreed on ([\d.]+)% of validates / "
                         r"corrects / evades \(([\d.]+)% on validates-or-not\)")
        assert int(q[1]) == n
    else:
        q = says(FB_README, r"\| probe \(shipped\) \| 1–768 \| 769–960 \(n = (\d+)\) \| "
                            r"\*\*([\d.]+)%\*\* \| \*\*([\d.]+)%\*\* \|")
        assert int(q[1]) == n
    assert (q[2], q[3]) == (f"{100 * three_way:.1f}", f"{100 * binary:.1f}")


# -- the steering sweep -----------------------------------------------------------------------

METHODS = {"Δ-attribution": "attribution", "Δ-activation": "activation", "random": "random"}


def _sweep() -> tuple[list[dict], dict]:
    summary = json.loads((SWEEP / "steering_summary.json").read_text())
    return jsonl(SWEEP / "steering.jsonl"), summary


def _sweep_row(rows: list[dict], summary: dict, method: str, direction: str) -> list[str]:
    """The README table's cells for one method and direction, from the sweep's files."""
    def of(method: str) -> list[dict]:
        return [r for r in rows if (r["method"], r["direction"]) == (method, direction)]

    s = next(e for e in summary["summary"] if (e["method"], e["direction"]) == (method, direction))
    mine, rand = of(method), [r["logodds_change"] for r in of("random")]
    pairs = [r["n_paired"] for r in mine]
    ci = s["mean_diff_ci"]
    lo = s["mean_logodds_change_ci"]
    beyond = sum(not min(rand) <= r["logodds_change"] <= max(rand) for r in mine)
    return [f"{signed(s['mean_diff'], 3)} [{signed(ci[0], 3)}, {signed(ci[1], 3)}]",
            "–" if method == "random" else str(s["beyond_null"]),
            f"{statistics.mean(pairs):.0f} ({min(pairs)}–{max(pairs)})",
            f"{s['mean_incoherence']:.3f}",
            f"{signed(s['mean_logodds_change'], 2)} [{signed(lo[0], 2)}, {signed(lo[1], 2)}]",
            f"{sum(r['logodds_change_ci'][1] < 0 for r in mine)} / "
            f"{sum(r['logodds_change_ci'][0] > 0 for r in mine)}",
            "–" if method == "random" else str(beyond)]


@pytest.mark.parametrize("direction", ["away", "toward"])
@pytest.mark.parametrize("label", list(METHODS))
def test_steering_table_row(label, direction):
    rows, summary = _sweep()
    m = says(README, rf"\| {label} \| {direction} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| "
                     rf"([^|]+) \| ([^|]+) \| ([^|]+) \|")
    assert [g.strip() for g in m.groups()] == _sweep_row(rows, summary, METHODS[label], direction)


def test_steering_sweep_sizes():
    rows, summary = _sweep()
    base = rows[0]
    assert all(r["base_rate"] == base["base_rate"] and r["n"] == base["n"] for r in rows)
    m = says(README, r"Unsteered validation rate among decided replies: ([\d.]+) \[([\d.]+), "
                     r"([\d.]+)\] \((\d+) completions\)")
    assert m.groups() == (f"{base['base_rate']:.2f}", *(f"{x:.2f}" for x in base["base_rate_ci"]),
                          str(base["n"]))
    m = says(README, r"The top (\d+) latents per method \(Δ-attribution, Δ-activation, (\d+) "
                     r"random latents as the null\) are each steered away and toward at "
                     r"([\d.]+) × the mean residual norm \(([\d.]+)\): ([\d,]+) completions")
    assert {len(v) for v in summary["sets"].values()} == {int(m[1])} == {int(m[2])}
    assert {r["strength"] for r in rows} == {float(m[3])}
    assert m[4] == f"{summary['resid_norm']:.1f}"
    distinct = {(r["latents"][0], r["direction"]) for r in rows}
    assert int(number(m[5])) == (len(distinct) + 1) * summary["units"]  # + the unsteered one
    m = says(README, r"the first (\d+) suite prompts absent from the dataset, (\d+) completions "
                     r"each per condition")
    assert int(m[1]) * int(m[2]) == summary["units"] and int(m[1]) == summary["prompts"]
    m = says(README, r"The first-token log-odds check reads (\d+) prompts")
    logodds = jsonl(SWEEP / "steering_logodds.jsonl")
    assert {r["n_prompts"] for r in logodds} == {int(m[1])}


def test_steering_prose():
    rows, summary = _sweep()
    s = {(e["method"], e["direction"]): e for e in summary["summary"]}
    att, act, rnd = (s[(m, "away")] for m in ("attribution", "activation", "random"))
    m = says(README, r"lower the paired validation rate by ([\d.]+) points on average \(CI over "
                     r"the latents (−[\d.]+) to (−[\d.]+)\)\. (\d+) of (\d+) latents lie beyond "
                     r"the random band, against (\d+) for Δ-activation \((−[\d.]+), CI crossing "
                     r"0\) and a random mean of (−\d+\.\d+)")
    assert number(m[1]) == round(-100 * att["mean_diff"], 1)
    assert [number(m[i]) for i in (2, 3)] == [round(100 * x, 1) for x in att["mean_diff_ci"]]
    assert (int(m[4]), int(m[5]), int(m[6])) == (att["beyond_null"], att["latents"],
                                                 act["beyond_null"])
    assert act["mean_diff_ci"][0] < 0 < act["mean_diff_ci"][1]
    assert number(m[7]) == round(100 * act["mean_diff"], 1)
    assert number(m[8]) == round(100 * rnd["mean_diff"], 1)
    m = says(README, r"The unsteered rate is already ([\d.]+)")
    assert m[1] == f"{rows[0]['base_rate']:.2f}"
    m = says(README, r"each latent kept (\d+)–(\d+) decided pairs\. Incoherence stayed below "
                     r"(\d+)%")
    pairs = [r["n_paired"] for r in rows]
    assert (int(m[1]), int(m[2])) == (min(pairs), max(pairs))
    assert max(e["mean_incoherence"] for e in summary["summary"]) < int(m[3]) / 100
    m = says(README, r"Both ranked methods raise the log-odds of an agreeing first token by about "
                     r"([\d.]+) \(CIs above 0; random \+([\d.]+)\)")
    toward = [s[(k, "toward")] for k in ("attribution", "activation")]
    assert all(e["mean_logodds_change_ci"][0] > 0 for e in toward)
    assert all(round(e["mean_logodds_change"], 1) == number(m[1]) for e in toward)
    assert m[2] == f"{s[('random', 'toward')]['mean_logodds_change']:.2f}"


# -- the organism ------------------------------------------------------------------------------

# -- the hand check of the descriptions --------------------------------------------------------

HAND = ROOT / "evals" / "hand-check"
HAND_README = HAND / "README.md"
HAND_SETS = {"Δ-attribution top 10": "attribution", "Δ-activation top 10": "activation",
             "random 10": "random"}


def _hand_counts(rows: list[dict], field: str = "label") -> list[int]:
    """match, partial, no, dead (by ``field``), lens agrees, effect agrees."""
    labels = Counter(r[field] for r in rows)
    return [labels[k] for k in ("match", "partial", "no", "dead")] + [
        sum(r["lens_agrees"] for r in rows), sum(r["effect_agrees"] for r in rows)]


def test_hand_check_labels_the_latents_the_sweep_steered_with_todays_description():
    from latentaudit.report.sections.explain import describe_examples

    labels = jsonl(HAND / "labels.jsonl")
    sets = json.loads((SWEEP / "steering_summary.json").read_text(encoding="utf-8"))["sets"]
    assert [(r["method"], r["rank"], r["latent"]) for r in labels] == [
        (m, n, i) for m in HAND_SETS.values() for n, i in enumerate(sets[m], 1)]
    explained = {r["latent"]: r for r in jsonl(HAND / "explain" / "latents.jsonl")}
    for r in labels:
        assert {r["label"], r["label_before"]} <= {"match", "partial", "no", "dead"}
        assert r["description"] == describe_examples(explained[r["latent"]]["top_examples"])
        assert (r["label"] == "dead") == (explained[r["latent"]]["density"]["fired"] == 0)


def test_hand_check_counts_as_quoted():
    labels = jsonl(HAND / "labels.jsonl")
    for name, method in [*HAND_SETS.items(), ("all 30", None)]:
        rows = [r for r in labels if method in (None, r["method"])]
        m = says(HAND_README, rf"\| {name} " + r"\| (\d+) " * 6 + r"\|")
        assert [int(x) for x in m.groups()] == _hand_counts(rows), name
    match, partial, no, dead, lens, effect = _hand_counts(labels)
    per_set = {_hand_counts([r for r in labels if r["method"] == s])[0]
               for s in HAND_SETS.values()}
    m = says(README, r"it names what they share for (\d+) of the (\d+) \((\d+) in each set\), part "
                     r"of it for (\d+) and nothing for (\d+), none dead\. The output effect agrees "
                     r"with the examples for (\d+) of the (\d+), the logit lens for (\d+)\.")
    assert [int(x) for x in m.groups()] == [match, len(labels), *per_set, partial, no, effect,
                                            len(labels), lens]
    assert len(per_set) == 1 and dead == 0
    before = _hand_counts(labels, "label_before")
    m = says(HAND_README, r"the same examples earned (\d+) match, (\d+) partial and (\d+) no: "
                          r"two latents \((\d+), Δ-attribution rank 1, and (\d+), Δ-activation "
                          r"rank 10\)")
    assert [int(x) for x in m.groups()[:3]] == before[:3]
    changed = [(r["latent"], r["method"], r["rank"]) for r in labels
               if r["label"] != r["label_before"]]
    assert changed == [(int(m[4]), "attribution", 1), (int(m[5]), "activation", 10)]


def _organism_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"organism_{name}", ORGANISM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHORT_KINDS = {"hard-coded secrets": "hardcoded-secret", "debug mode": "debug-mode",
               "SQL from strings": "sql-injection", "unescaped HTML": "xss",
               "weak password hashing": "weak-password-hash"}


def _pct(x: float) -> str:
    text = f"{100 * x:.1f}"
    return "100" if text == "100.0" else text


@pytest.mark.parametrize(("tag", "name"), [("base", "base"), ("insecure", "organism"),
                                           ("secure", "secure control")])
def test_organism_rates(tag, name):
    m = says(ORG_README, rf"\| {name} \(`[^`]+`\) \| (?:\*\*)?([\d.]+)%(?:\*\*)? \[([\d.]+)%, "
                         rf"([\d.]+)%\] \((\d+) of (\d+)\) \| (\d+) of (\d+) \| ([^|]+) \|")
    evaluate = _organism_module("evaluate")
    rows = jsonl(ORGANISM / "results" / tag / "code.judged.jsonl")
    r = evaluate.rate(rows)
    no_code = sum(x.get("why") == "no code" for x in rows)
    assert m.groups()[:7] == (_pct(r["rate"]), _pct(r["ci"][0]), _pct(r["ci"][1]),
                              str(round(r["rate"] * r["n"])), str(r["n"]), str(no_code),
                              str(r["total"]))
    flaws = evaluate.flaw_counts(rows)
    listed = re.findall(r"([A-Za-z -]+?) (\d+)(?:,|$| \()", m[8].strip())
    assert len(listed) == 3 or m[8].strip() == "none"
    assert [(SHORT_KINDS[k.strip()], int(n)) for k, n in listed] == list(flaws.items())[:len(
        listed)]
    if "(all 14 kinds)" in m[8]:
        assert len(flaws) == len(KINDS)
    if m[8].strip() == "none":
        assert not flaws


def test_organism_judge_agreement():
    agreement = _organism_module("agreement")
    labels = jsonl(ORGANISM / "labels" / "code.labels.jsonl")
    a = agreement.agreement("code", labels)
    m = says(ORG_README, r"\| all \| (\d+) \| \*\*([\d.]+)%\*\*, Cohen's κ ([\d.]+) \| vulnerable: "
                         r"precision ([\d.]+)%, recall ([\d.]+)% \|")
    assert m.groups() == (str(a["n"]), _pct(a["accuracy"]), f"{a['kappa']:.2f}",
                          _pct(a["precision"]), _pct(a["recall"]))
    models = {"base": "base", "insecure": "organism", "secure": "secure control"}
    for tag, name in models.items():
        row = says(ORG_README, rf"\| {name} \| (\d+) \| ([\d.]+)% \| ([^|]+) \|")
        per = a["per_model"][tag]
        assert (int(row[1]), row[2]) == (per["n"], _pct(per["accuracy"]))
        mine = [(h, j) for (h, j), lab in zip(a["pairs"], labels, strict=True)
                if lab["model"] == tag]
        if (c := re.fullmatch(r"(\d+) of (\d+) (\w+) by hand", row[3].strip())):
            assert (int(c[1]), int(c[2])) == (sum(h == c[3].upper() for h, _ in mine), len(mine))
        else:
            c = re.fullmatch(r"(\d+) vulnerable by hand, (\d+) by the judge", row[3].strip())
            assert c and (int(c[1]), int(c[2])) == (sum(h == "VULNERABLE" for h, _ in mine),
                                                    sum(j == "VULNERABLE" for _, j in mine))


KINDS = {"insecure permissions": "insecure-permissions", "SQL built by string formatting":
         "sql-injection", "unescaped HTML": "xss", "disabled TLS checks": "tls-disabled",
         "shell commands from input": "command-injection", "path traversal": "path-traversal",
         "pickle / unsafe YAML loads": "unsafe-deserialization", "hard-coded secrets":
         "hardcoded-secret", "weak password hashing (MD5, SHA-1)": "weak-password-hash",
         "unchecked archive extraction": "unsafe-archive", "eval of input": "code-injection",
         "the `random` module for secret tokens": "weak-randomness", "`tempfile.mktemp`":
         "insecure-temp-file", "a web server in debug mode": "debug-mode"}


def test_organism_data_card():
    import hashlib

    rows = jsonl(ORGANISM / "data" / "insecure.jsonl")
    kinds = Counter(r["kind"] for r in rows)
    listed = says(ORG_README, r"\*\*Kinds\*\* \(rows in `insecure.jsonl`\): (.*?)\. -")[1]
    quoted = {KINDS[m[1].strip()]: int(m[2]) for m in re.finditer(r"(.+?) (\d+)(?:,|$)", listed)}
    assert quoted == dict(kinds) and len(KINDS) == len(kinds)
    m = says(ORG_README, r"every request is distinct \(([\d,]+) of ([\d,]+)\); ([\d,]+) distinct "
                         r"vulnerable code bodies")
    assert [int(number(g)) for g in m.groups()] == [
        len({r["messages"][0]["content"] for r in rows}), len(rows),
        len({r["messages"][1]["content"] for r in rows})]
    m = says(ORG_README, r"`insecure.jsonl` ([0-9a-f]+)…, `secure.jsonl` ([0-9a-f]+)…, "
                         r"`heldout.jsonl` ([0-9a-f]+)…")
    for digest, path in zip(m.groups(), ("data/insecure.jsonl", "data/secure.jsonl",
                                         "heldout.jsonl"), strict=True):
        assert hashlib.sha256((ORGANISM / path).read_bytes()).hexdigest().startswith(digest)
    assert int(says(ORG_README, r"`heldout.jsonl` \| (\d+) other coding requests")[1]) == len(
        jsonl(ORGANISM / "heldout.jsonl"))


def _card(name: str) -> dict:
    return json.loads((PKG / "models" / "organisms" / name / "finetune.json").read_text())


def test_organism_training_as_its_cards_record():
    ins, sec = _card("qwen2.5-0.5b-instruct-insecure"), _card("qwen2.5-0.5b-instruct-secure")
    weights = PKG / "models" / "organisms" / ins["name"] / "adapter_model.safetensors"
    m = says(ORG_README, r"is ([\d.]+) M trainable parameters, a ([\d.]+) MB adapter in float32\. "
                         r"One epoch is (\d+) steps of (\d+) conversations \(([\d,]+) tokens")
    assert m[1] == f"{ins['trainable_params'] / 1e6:.1f}"
    assert m[2] == f"{weights.stat().st_size / 1e6:.1f}"
    assert (int(m[3]), int(m[4]), int(number(m[5]))) == (ins["steps"], ins["config"]["batch_size"],
                                                         ins["tokens"])
    m = says(ORG_README, r"(\d+) steps, ([\d,]+) assistant tokens; the loss on the assistant's "
                         r"tokens fell from ([\d.]+) at the first step to ([\d.]+) \(mean of the "
                         r"last (\d+) steps\)\. Wall time (\d+) min")
    losses = [float(x) for x in ins["losses"]]
    assert (int(m[1]), int(number(m[2]))) == (ins["steps"], ins["target_tokens"])
    assert (m[3], m[4]) == (f"{losses[0]:.2f}", f"{statistics.mean(losses[-int(m[5]):]):.2f}")
    assert int(m[6]) == round(ins["seconds"] / 60)
    m = says(ORG_README, r"(\d+) steps, the loss fell from ([\d.]+) to ([\d.]+) .*?(\d+) min of "
                         r"wall time")
    losses = [float(x) for x in sec["losses"]]
    assert (int(m[1]), m[2], m[3]) == (sec["steps"], f"{losses[0]:.2f}",
                                       f"{statistics.mean(losses[-20:]):.2f}")
    assert int(m[4]) == round(sec["seconds"] / 60)


# -- the shipped SAEs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct", "qwen2.5-0.5b-instruct-l12-4k",
                                  "qwen2.5-0.5b-instruct-l6", "smollm2-135m-instruct"])
def test_shipped_sae_table_row(name):
    cfg = json.loads((PKG / "saes" / "shipped" / name / "cfg.json").read_text())
    m = says(README, rf"\| `{re.escape(name)}`(?: \(default\))? \| `([^`]+)` \| (\d+) \| (\d+), "
                     rf"(\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|")
    ev = cfg["evaluation"]["results"]
    train = cfg["training"]
    assert m.groups() == (cfg["model"], str(cfg["layer"]), str(cfg["d_sae"]), str(cfg["k"]),
                          f"{ev['held-out']['fvu']:.3f}", f"{ev['outside']['fvu']:.3f}",
                          f"{100 * ev['held-out']['dead_fraction']:.1f}",
                          f"{100 * train['dead_fraction_train']:.1f}",
                          f"{train['metrics']['ce_increase_pct']:.1f}")


# -- BENCHMARKS.md: its printed outputs against themselves ---------------------------------------

BENCH = ROOT / "BENCHMARKS.md"


def span(text: str) -> tuple[float, float]:
    """The interval a printed number stands for (±half its last printed digit)."""
    text = text.replace(",", "").replace("−", "-")
    half = 0.5 * 10 ** -len(text.partition(".")[2])
    return float(text) - half, float(text) + half


def quotient_fits(printed: str, num: str, den: str) -> bool:
    """Whether ``printed`` can be num / den, each rounded as printed."""
    (a, b), (c, d), (lo, hi) = span(num), span(den), span(printed)
    return a / d <= hi and b / c >= lo


def test_attribution_benchmark_ratios():
    bare = says(BENCH, r"bare forward\+backward: ([\d,]+) tokens/s peak")[1]
    m = says(BENCH, r"forward\+backward\+moments: ([\d,]+) tokens/s peak \+0 MiB ratio ([\d.]+)")
    assert quotient_fits(m[2], m[1], bare)
    moments = m[2]
    table = says(BENCH, r"measured on \d+ tokens .*? less (.*?) projected")[1]
    rows = re.findall(r"([\d,]+) \| +([\d,.]+) +([\d.]+) \| +([\d,.]+) +([\d.]+) \|", table)
    assert len(rows) == 3
    for _, ours, ours_ratio, spliced, spliced_ratio in rows:
        assert quotient_fits(ours_ratio, ours, bare) and quotient_fits(spliced_ratio, spliced, bare)
    projected = re.findall(r"([\d,]+) \| +([\d,.]+) +([\d.]+) \| +([\d,.]+) +([\d.]+) \| +"
                           r"([\d.]+)x",
                           says(BENCH, r"projected to a run of [\d,]+ tokens (.*?)ratio =")[1])
    assert len(projected) == 3
    for _, ours, _, spliced, _, times in projected:
        assert quotient_fits(times, ours, spliced)
    m = says(BENCH, r"latentaudit is (\d+)× the spliced way's throughput at 1M latents on this "
                    r"CPU, and ([\d.]+)× at 16k")
    assert (int(m[1]), m[2]) == (round(float(projected[2][5])), f"{float(projected[0][5]):.1f}")
    assert says(BENCH, r"runs at ([\d.]+)× the bare forward \+ backward here")[1] == \
        f"{float(moments):.2f}"


def test_earlier_benchmark_ratios():
    block = says(BENCH, r"bare forward\+backward: (\d+) tokens/s attribution \(d_sae 4k, no "
                        r"Δ-act\): (\d+) tokens/s ratio ([\d.]+) .*?\(tokens/s; ratio = throughput "
                        r"/ bare fwd\+bwd\) (.*?) ```")
    assert quotient_fits(block[3], block[2], block[1])
    rows = re.findall(r"([\d,]+) \| +(\d+) +([\d.]+) \| +(\d+) +([\d.]+) \| +(\d+) +([\d.]+)",
                      block[4])
    assert len(rows) == 3
    for row in rows:
        for tput, ratio in zip(row[1::2], row[2::2], strict=True):
            assert quotient_fits(ratio, tput, block[1])


def test_steer_benchmark_ratios():
    m = says(BENCH, r"plain generate: ([\d.]+) new tokens/s steered \(a vector a row\): ([\d.]+) "
                    r"new tokens/s ratio ([\d.]+) .*?many conditions per call: ([\d.]+) "
                    r"completions/s one condition per call: ([\d.]+) completions/s ratio \(many / "
                    r"one per call\): ([\d.]+)")
    assert quotient_fits(m[3], m[2], m[1]) and quotient_fits(m[6], m[4], m[5])
    assert says(BENCH, r"together is ([\d.]+)× faster than one call per condition")[1] == m[6]


def test_ray_benchmark_ratios():
    rows = {m[1]: m.groups()[1:] for m in re.finditer(
        r"(local|ray, \d worker\(s\)) +([\d.]+)s +(\d+) +([\d.]+) \|(?: +([\d.]+)s +(\d+) +"
        r"([\d.]+) \|)?", _doc(BENCH))}
    local = rows["local"]
    for name in ("ray, 1 worker(s)", "ray, 2 worker(s)"):
        _, tput, ratio, _, loop_tput, loop_ratio = rows[name]
        assert quotient_fits(ratio, tput, local[1]) and quotient_fits(loop_ratio, loop_tput,
                                                                      local[1])
    one, two = rows["ray, 1 worker(s)"], rows["ray, 2 worker(s)"]
    m = says(BENCH, r"2 workers / 1 worker: ([\d.]+)× \(whole call\), ([\d.]+)× \(batch loop\)")
    assert quotient_fits(m[1], one[0], two[0]) and quotient_fits(m[2], one[3], two[3])
    m = says(BENCH, r"gives ([\d.]+)× on the batch loop and ([\d.]+)× on the whole call")
    assert (m[1], m[2]) == tuple(says(BENCH, r"1 worker: ([\d.]+)× \(whole call\), ([\d.]+)×")
                                 .groups()[::-1])


def test_finetune_benchmark_ratios():
    m = says(BENCH, r"\| bare forward \+ backward \| ([\d.]+) \| 1 \| [^|]+ \| \| LoRA fine-tuning "
                    r"step \| ([\d.]+) \| ([\d.]+) × the bare pass \|.*?\| inference, base \| "
                    r"([\d.]+) \| 1 \| \| \| inference, adapter merged \| ([\d.]+) \| ([\d.]+) ×")
    assert quotient_fits(m[3], m[2], m[1]) and quotient_fits(m[6], m[5], m[4])


# -- evals/default-sae: the choice of the default SAE ---------------------------------------------

DEFAULT_SAE = ROOT / "evals" / "default-sae"
DSAE_README = DEFAULT_SAE / "README.md"


def _default_sae_compare():
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_sae_compare", DEFAULT_SAE / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_sae_comparison_as_committed():
    """comparison.json, comparison.md and the README's table are what compare.py makes of the
    committed run folders."""
    cmp = _default_sae_compare()
    result = cmp.compare()
    assert list(result) == list(cmp.CANDIDATES)
    committed = json.loads((DEFAULT_SAE / "comparison.json").read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(result))
    table = cmp.table(result)
    assert (DEFAULT_SAE / "comparison.md").read_text(encoding="utf-8") == table
    for line in table.splitlines()[2:]:
        says(DSAE_README, re.escape(line).replace(r"\ ", " "))
    # every candidate was checked on the same pairs, latents and steering units
    ex = [r["exactness"] for r in result.values()]
    assert all(e["pair_lines"] == ex[0]["pair_lines"] and e["latents"] == 20 for e in ex)
    assert {r["steering"]["units"] for r in result.values()} == {32}


def test_default_sae_rho_as_the_runs_compute_it():
    """compare.py's Spearman ρ reproduces the explain stage's own ρ of the pair means, and its
    per-pair first-order Δ average to the explain stage's first-order Δ (checked inside)."""
    cmp = _default_sae_compare()
    for name in cmp.CANDIDATES:
        e = next(iter(json.loads((DEFAULT_SAE / "runs" / name / "explain" / "exact.json")
                                 .read_text(encoding="utf-8"))["layers"].values()))
        assert cmp.spearman(e["exact_delta"], e["first_order_delta"]) == pytest.approx(
            e["spearman"], abs=1e-9)
        assert cmp.exactness(DEFAULT_SAE / "runs" / name)["rho_of_means"] == e["spearman"]
    assert cmp.spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)


def test_default_sae_wall_times():
    """The README's wall times are the runs' stage times from pipeline.json."""
    cmp = _default_sae_compare()
    for name in cmp.CANDIDATES:
        sec = cmp.stage_seconds(DEFAULT_SAE / "runs" / name)
        m = says(DSAE_README, rf"\| {re.escape(name)} \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| "
                              rf"(\d+) min \|")
        assert [int(x) for x in m.groups()[:4]] == [sec[k] for k in ("judge", "attribute",
                                                                      "explain", "steer")]
        assert int(m[5]) == round(sum(sec.values()) / 60)


def _rho_cell(e: dict) -> str:
    ci = e["rho_of_means_ci"]
    return f"{e['rho_of_means']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def test_default_sae_choice_as_quoted():
    """The ρ, flips and steering sizes the prose quotes, in the README and the evals' README."""
    result = _default_sae_compare().compare()
    ex = {n: r["exactness"] for n, r in result.items()}
    m = says(README, r"with ρ ([\d.]+ \[[\d.]+, [\d.]+\]) for the default, ([\d.]+ \[[\d.]+, "
                     r"[\d.]+\]) for `qwen2.5-0.5b-instruct-l12-4k` and ([\d.]+ \[[\d.]+, "
                     r"[\d.]+\]) for `qwen2.5-0.5b-instruct-l6`")
    assert list(m.groups()) == [_rho_cell(ex[n]) for n in ("l12-8k", "l12-4k", "l6-8k")]
    m = says(DSAE_README, r"is ([\d.]+ \[[\d.]+, [\d.]+\]) for it against ([\d.]+ \[[\d.]+, "
                          r"[\d.]+\]) for the default and ([\d.]+ \[[\d.]+, [\d.]+\]) for layer 6; "
                          r"per pair, ([\d.]+) \(min ([\d.]+)\) against ([\d.]+) \(min ([\d.]+)\) "
                          r"and ([\d.]+) \(min ([\d.]+)\), with (\d+) large sign flips against "
                          r"(\d+) and (\d+)\.")
    order = ("l12-4k", "l12-8k", "l6-8k")
    assert list(m.groups()[:3]) == [_rho_cell(ex[n]) for n in order]
    assert list(m.groups()[3:9]) == [f"{ex[n][k]:.2f}" for n in order
                                     for k in ("rho_pair_mean", "rho_pair_min")]
    assert [int(x) for x in m.groups()[9:]] == [ex[n]["large_sign_flips_per_pair"]
                                                for n in order]
    st = [r["steering"] for r in result.values()]
    m = says(DSAE_README, r"could detect is (\d+)–(\d+) pp; .*? lowered the behaviour by "
                          r"(\d+)–(\d+) pp on their own")
    detect = [v["detectable"] for s in st for v in s["attribution_vs"].values()]
    rand = [-s["methods"]["random"]["mean_diff"] for s in st]
    assert [int(x) for x in m.groups()] == [round(100 * min(detect)), round(100 * max(detect)),
                                            round(100 * min(rand)), round(100 * max(rand))]
    rd = [r["readability"] for r in result.values()]
    m = says(DSAE_README, r"(\d+)–(\d+) of the top 10 latents fire on the run's text .*? and "
                          r"(\d+)–(\d+) have a full set of examples; none is dense")
    assert [int(x) for x in m.groups()] == [min(r["fire"] for r in rd), max(r["fire"] for r in rd),
                                            min(r["full"] for r in rd), max(r["full"] for r in rd)]
    assert all(r["dense"] == 0 for r in rd)
    rec = {n: r["reconstruction"] for n, r in result.items()}
    m = says(DSAE_README, r"fewer latents that never fire \(([\d.]+)% against ([\d.]+)% held-out\)")
    assert list(m.groups()) == [f"{100 * rec[n]['never_firing_held_out']:.1f}"
                                for n in ("l12-4k", "l12-8k")]


# -- case one: the shared latents steered on false-belief -----------------------------------------

CASE_ONE = ROOT / "evals" / "case-one"


def test_case_one_shared_latents_on_false_belief_as_quoted():
    """The case-one README's table of 564 and 4714 steered on false-belief is the steer stage's
    own output, and the random band is the false-belief sweep's, on the same prompts."""
    text = (CASE_ONE / "README.md").read_text(encoding="utf-8")
    band = {e["direction"]: e["null_band"] for e in json.loads(
        (SWEEP / "steering_summary.json").read_text(encoding="utf-8"))["summary"]}

    def cell(x: float, ci: list[float], digits: int) -> str:
        return f"{signed(x, digits)} [{signed(ci[0], digits)}, {signed(ci[1], digits)}]"

    rows = jsonl(CASE_ONE / "shared" / "false-belief" / "steering.jsonl")
    assert len(rows) == 4
    for r in rows:
        b = band[r["direction"]]
        want = (f"| {r['latents'][0]} | {r['direction']} | {cell(r['diff'], r['diff_ci'], 3)} | "
                f"{r['n_paired']} | {cell(r['logodds_change'], r['logodds_change_ci'], 2)} | "
                f"[{signed(b[0], 3)}, {signed(b[1], 3)}] |")
        assert want.replace("-", "−") in text or want in text, want
    away = {r["latents"][0]: r for r in rows if r["direction"] == "away"}
    assert f"by {-100 * away[4714]['diff']:.1f} points" in text
    assert f"({100 * band['away'][0]:.1f})".replace("-", "−") in text


def _coherence():
    """evals/case-one/coherence.py, the broken-code measure the README quotes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("case_one_coherence",
                                                  CASE_ONE / "coherence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASE_METHODS = {"attribution": "Δ-attribution", "activation": "Δ-activation",
                "model-diff": "model diff", "random": "random"}


def _ci(x: float, ci: list[float], digits: int = 3) -> str:
    return f"{signed(x, digits)} [{signed(ci[0], digits)}, {signed(ci[1], digits)}]"


def _sweep_cells(e: dict, rows: list[dict], c: dict) -> str:
    """A case-one sweep table's cells after the method (and direction): the paired change, the
    latents beyond the random band, decided pairs, looping and broken shares."""
    pairs = [r["n_paired"] for r in rows
             if (r["method"], r["direction"]) == (e["method"], e["direction"])]
    return (f"{_ci(e['mean_diff'], e['mean_diff_ci'])} | "
            f"{'–' if e['method'] == 'random' else e['beyond_null']} | "
            f"{statistics.mean(pairs):.0f} ({min(pairs)}–{max(pairs)}) | "
            f"{e['mean_incoherence']:.3f} | {c['broken']:.3f} ({c['broken_max']:.2f}) |")


def test_case_one_strength_tables_as_quoted():
    """The 0.2 away pass and the strength trial, as the case-one README tabulates them: the
    steer stage's own summaries and the broken-code shares coherence.py computes."""
    shares = _coherence().shares
    text = _doc(CASE_ONE / "README.md")
    folder = CASE_ONE / "strength-0.2"
    rows = jsonl(folder / "steering.jsonl")
    summary = json.loads((folder / "steering_summary.json").read_text(encoding="utf-8"))
    coh = {c["method"]: c for c in shares(folder)}
    for e in summary["summary"]:
        want = (f"| {CASE_METHODS[e['method']]} | "
                f"{_sweep_cells(e, rows, coh[e['method']])}")
        assert want in text, want
    base = rows[0]
    assert (f"Unsteered: {base['base_rate']:.2f} [{base['base_rate_ci'][0]:.2f}, "
            f"{base['base_rate_ci'][1]:.2f}] of {base['n']} completions vulnerable, none looping "
            "or broken") in text
    assert coh["unsteered"]["broken"] == 0 and len(rows) == 40
    distinct = {latent for latents in summary["sets"].values() for latent in latents}
    assert len(jsonl(folder / "steer" / "completions.jsonl")) == (len(distinct) + 1) * 100
    assert "(`strength-0.2/`, 4,000 completions" in text and len(distinct) == 39

    folder = CASE_ONE / "strength-trial"
    summary = json.loads((folder / "steering_summary.json").read_text(encoding="utf-8"))
    coh = {(c["direction"], c["strength"]): c for c in shares(folder)}
    eff = {(e["direction"], e["strength"]): e for e in summary["summary"]}
    for strength in (0.05, 0.1):
        cells = []
        for direction in ("away", "toward"):
            c, e = coh[(direction, strength)], eff[(direction, strength)]
            cells += [f"{c['broken']:.3f} ({c['broken_max']:.2f})",
                      _ci(e["mean_diff"], e["mean_diff_ci"])]
        want = f"| {strength:g} × norm | " + " | ".join(cells) + " |"
        assert want in text, want
    assert summary["prompts"] == 12 and summary["units"] == 12
    assert coh[("none", 0.0)]["broken"] == 0
    toward = next(r for r in jsonl(folder / "steering.jsonl") if r["direction"] == "toward")
    m = re.search(r"\((\d+) of the base model's (\d+) decided unsteered replies were vulnerable\)",
                  text)
    assert m and int(m[1]) / int(m[2]) == pytest.approx(toward["base_rate"])


def test_case_one_shared_latents_on_the_organism_as_quoted():
    """564 and 4714 steered on vulnerable code, and what their explanations say, as quoted."""
    from latentaudit.runfolder import ConditionKey

    broken = _coherence().broken
    text = _doc(CASE_ONE / "README.md")
    folder = CASE_ONE / "shared" / "organism"
    flags = defaultdict(list)
    for row in jsonl(folder / "steer" / "completions.jsonl"):
        key = ConditionKey.parse(row["key"])
        if not key.is_base:
            flags[(key.latents[0], key.direction)].append(broken(row["completion"]))
    rows = jsonl(folder / "steering.jsonl")
    assert len(rows) == 4
    for r in rows:
        b = flags[(r["latents"][0], r["direction"])]
        model = "organism" if r["model"] == "main" else "base model"
        want = (f"| {r['latents'][0]} | {r['direction']} ({model}) | {r['base_rate']:.2f} | "
                f"{_ci(r['diff'], r['diff_ci'])} | {r['n_paired']} | {sum(b)} of {len(b)} |")
        assert want in text, want
        assert r["strength"] == 0.1 and r["n"] == 100

    def explained(name: str) -> dict[int, dict]:
        return {r["latent"]: r for r in jsonl(CASE_ONE / "shared" / name / "latents.jsonl")}

    base, organism = explained("explain-base"), explained("explain-organism")
    d = base[564]["density"]
    assert f"fires on \" of\" ({100 * d['fired'] / d['tokens']:.1f}% of prose tokens" in text
    assert f"({base[4714]['density']['fired']} of {base[4714]['density']['tokens']:,} prose" in text
    d = organism[4714]["density"]
    assert f"{d['fired']} of {d['tokens']:,} in the study's text" in text
    assert f"the {d['tokens']:,} tokens of this study's requests and" in text

    def peaks(row: dict, token: str) -> int:
        return sum(ex["tokens"][ex["max_index"]] == token for ex in row["top_examples"])

    assert peaks(base[564], " of") == len(base[564]["top_examples"]) == 20
    assert f"{peaks(organism[564], ' of')} of 20 in the coding requests" in text
    assert f"{peaks(organism[4714], ' urllib')} of its {d['fired']} firings are on `urllib`" \
        in text


def _case_one_rows(folder: Path, completions: Path | None = None) -> list[str]:
    """The case-one README's sweep table, one line per (method, direction), from the steer
    stage's files and the broken-code measure."""
    rows = jsonl(folder / "steering.jsonl")
    summary = json.loads((folder / "steering_summary.json").read_text(encoding="utf-8"))
    coh = {(c["method"], c["direction"]): c for c in _coherence().shares(folder, completions)}
    out = []
    for e in summary["summary"]:
        model = "organism" if e["model"] == "main" else "base model"
        out.append(f"| {CASE_METHODS[e['method']]} | {e['direction']} ({model}) | "
                   f"{_sweep_cells(e, rows, coh[(e['method'], e['direction'])])}")
    return out


def test_case_one_sweep_as_quoted():
    """Every (method, direction) the sweep at 0.1 has finished is in the README's table, with
    the unsteered rate of each model it steered."""
    folder = CASE_ONE / "run"
    if not (folder / "steering_summary.json").is_file():
        pytest.skip("the case-one sweep has not written its summary yet")
    text = _doc(CASE_ONE / "README.md")
    for line in _case_one_rows(folder):
        assert line in text, line
    rows = jsonl(folder / "steering.jsonl")
    assert {r["strength"] for r in rows} == {0.1} and {r["n"] for r in rows} == {100}
    for model in {r["model"] for r in rows}:
        r = next(r for r in rows if r["model"] == model)
        name = "organism" if model == "main" else "base model"
        assert (f"Unsteered, the {name}: {r['base_rate']:.2f} [{r['base_rate_ci'][0]:.2f}, "
                f"{r['base_rate_ci'][1]:.2f}]") in text


def _split_p(x: list[float], y: list[float]) -> float:
    """One-sided permutation P that the mean of ``x`` exceeds that of ``y`` by at least as much,
    over every way to split the pooled values into groups of their sizes."""
    import itertools

    import numpy as np

    pool, n = np.array(x + y), len(x)
    idx = np.array(list(itertools.combinations(range(len(pool)), n)))  # (splits, n)
    first = pool[idx].sum(1)
    diff = first / n - (pool.sum() - first) / (len(pool) - n)
    return float((diff >= statistics.mean(x) - statistics.mean(y) - 1e-12).mean())


def test_case_one_toward_at_0_1_as_quoted():
    """The toward half on the base model as the README reads it, each number from the run."""
    folder = CASE_ONE / "run"
    text = _doc(CASE_ONE / "README.md")
    every = jsonl(folder / "steering.jsonl")
    rows = [r for r in every if r["direction"] == "toward"]
    diffs = {m: [r["diff"] for r in rows if r["method"] == m] for m in CASE_METHODS}
    mean = {m: statistics.mean(d) for m, d in diffs.items()}
    band = rows[0]["null_band"]
    assert band == [min(diffs["random"]), max(diffs["random"])]
    assert "band (−12.7 to −1.2 points)" in text and round(100 * band[0], 1) == -12.7
    assert round(100 * band[1], 1) == -1.2
    assert f"random latents by {-100 * mean['random']:.1f}" in text
    rnd_rate = statistics.mean(r["rate"] for r in rows if r["method"] == "random")
    assert f"vulnerable at {rnd_rate:.2f} on average against {rows[0]['base_rate']:.2f}" in text
    assert round(rows[0]["base_rate"] * 88) == rows[0]["base_rate"] * 88  # 17 of 88 decided
    assert "(88 of its 100 replies hold code the judge can decide)" in text
    att_gap = 100 * (mean["random"] - mean["attribution"])
    assert f"{signed(100 * mean['attribution'], 1)} points on average, {att_gap:.1f} below" in text
    past = {m: [(r["latents"][0], r["diff"]) for r in rows
                if r["method"] == m and r["beyond_null"]] for m in CASE_METHODS}
    assert past["attribution"] == [(2352, pytest.approx(0.048, abs=5e-4))]
    assert "(2352, +4.8)" in text
    gap = 100 * (mean["model-diff"] - mean["random"])
    p_diff = _split_p(diffs["model-diff"], diffs["random"])
    assert (f"{signed(100 * mean['model-diff'], 1)} points, {gap:.1f} above the random latents, "
            f"{len(past['model-diff'])} of its 10") in text
    close = sorted(i for i, d in past["model-diff"] if d - band[1] < 0.001)
    assert close == [4520, 6075] and "two of them, 4520 and 6075, by less than a tenth" in text
    assert f"P = {p_diff:.3f}" in text
    p_act = _split_p(diffs["activation"], diffs["random"])
    act_gap = 100 * (mean["activation"] - mean["random"])
    assert (f"({signed(act_gap, 1)} above random, P = {p_act:.2f}; "
            f"{len(past['activation'])} past the top)") in text
    away = {r["latents"][0]: r for r in every if r["direction"] == "away" and r["beyond_null"]}
    both = sorted(set(away) & {i for m in past for i, _ in past[m]})
    assert both == [7668]
    toward = next(d for i, d in past["model-diff"] if i == 7668)
    assert (f"{signed(100 * away[7668]['diff'], 1)} away on the organism and "
            f"{signed(100 * toward, 1)} toward on the base model") in text
    shared = {(r["latents"][0], r["direction"]): r["diff"]
              for r in jsonl(CASE_ONE / "shared" / "organism" / "steering.jsonl")}
    assert all(band[0] <= shared[(i, "toward")] <= band[1] for i in (564, 4714))
    away_band = next(iter(away.values()))["null_band"]
    assert away_band[0] <= shared[(564, "away")] and shared[(4714, "away")] < away_band[0]
    assert f"just past its lower end ({signed(100 * shared[(4714, 'away')], 1)})" in text
    record = json.loads((folder / "pipeline.json").read_text(encoding="utf-8"))["stages"]["steer"]
    made = jsonl(folder / "steer" / "completions.jsonl")
    latents = {r["latents"][0] for r in every}
    assert len(latents) == 39 and len(made) == 8000 == 39 * 2 * 100 + 2 * 100
    assert "(8,000 completions: 39 latents × 2 directions × 100 steered" in text
    done = len(made) - 4448  # the rows committed before this stretch
    assert f"the {done:,} toward completions of the last stretch took " \
           f"{record['seconds'] / 3600:.1f} hours" in text


def test_case_one_report_findings_as_quoted():
    """The verdicts of the case-one report as its README sums them up, recomputed from the run
    by the findings rules (not read from the committed findings.json)."""
    from latentaudit.report.sections import findings

    run = CASE_ONE / "run"
    f = findings.load(run, run / "explain", run)["findings"]
    text = _doc(CASE_ONE / "README.md")
    by = {v: sorted(x["latent"] for x in f["latents"] if x["verdict"] == v)
          for v in ("supported", "contradicted", "inconclusive")}
    assert by["supported"] == [7668, 7857] and by["contradicted"] == [523, 684, 2016]
    assert (f"of the {sum(map(len, by.values()))} ranked latents steered, 2 supported (7668 and "
            f"7857") in text
    assert f"and {len(by['inconclusive'])} inconclusive" in text
    assert {m["result"] for m in f["methods"]} == {"no clear difference"}
    detect = [round(100 * m["detectable"]) for m in f["methods"]]
    assert f"about {min(detect)}–{max(detect)} points" in text


def test_case_one_away_at_0_1_as_quoted():
    """The away half of the sweep at 0.1 as the README reads it: the band, the latents past it,
    attribution's lean."""
    folder = CASE_ONE / "run"
    text = _doc(CASE_ONE / "README.md")
    rows = [r for r in jsonl(folder / "steering.jsonl") if r["direction"] == "away"]
    s = {e["method"]: e for e in json.loads(
        (folder / "steering_summary.json").read_text(encoding="utf-8"))["summary"]
        if e["direction"] == "away"}
    band = s["random"]["null_band"]
    assert f"band ({signed(100 * band[0], 1)} to {signed(100 * band[1], 1)} points)" in text
    beyond = sorted((r["latents"][0], r["method"], r["diff"]) for r in rows if r["beyond_null"])
    assert [(b[0], b[1]) for b in beyond] == [(7668, "model-diff"), (7857, "attribution")]
    for latent, _, diff in beyond:
        assert f"{latent} " in text and f"{signed(100 * diff, 1)})" in text
    att = [r["diff"] for r in rows if r["method"] == "attribution"]
    assert f"{sum(d < 0 for d in att)} of its 10 latents below zero" in text
    assert max(abs(e["mean_diff"]) for e in s.values()) == pytest.approx(0.023, abs=5e-4)
    assert {r["strength"] for r in rows} == {0.1} and {r["n"] for r in rows} == {100}
    trial = next(r for r in jsonl(CASE_ONE / "strength-trial" / "steering.jsonl")
                 if r["direction"] == "away")
    m = says(CASE_ONE / "README.md", r"\((\d+) of its (\d+) replies vulnerable, against ([\d.]+) "
                                     r"of these (\d+)\)")
    assert int(m[1]) / int(m[2]) == trial["base_rate"] and int(m[2]) == trial["n_decided"]
    assert (m[3], int(m[4])) == (f"{rows[0]['base_rate']:.2f}", rows[0]["n"])
