"""The findings rules (report/findings.py) on hand-built steering and exactness records: each
verdict branch, the power and method comparisons, the trust in ρ, every disagreement, and the
findings section of the report (escaped, and in Chromium without a console error)."""

from __future__ import annotations

import json
import math
import re

import pytest

from latentaudit.report import findings as F

L = 3


def row(latent, direction, diff, ci, *, method="attribution", beyond=True, strength=0.5,
        n_paired=40, **kw):
    return {"method": method, "latents": [latent], "direction": direction, "strength": strength,
            "model": "main", "diff": diff, "diff_ci": ci, "beyond_null": beyond,
            "n_paired": n_paired, "null_band": [-0.05, 0.05], **kw}


def logodds(latent, direction, change, ci, strength=0.5):
    return {"latents": [latent], "direction": direction, "strength": strength, "model": "main",
            "change": change, "ci": ci}


def one(inputs: F.Inputs, latent: int) -> dict:
    return next(f for f in F.latent_findings(inputs) if f["latent"] == latent)


def test_signs_of_evidence():
    assert F.sign_of_change([-0.3, -0.1], "away") == 1    # removing it lowers the behaviour
    assert F.sign_of_change([0.1, 0.3], "away") == -1
    assert F.sign_of_change([0.1, 0.3], "toward") == 1
    assert F.sign_of_change([-0.3, -0.1], "toward") == -1
    assert F.sign_of_change([-0.3, 0.0], "away") == 0     # touches 0: undecided
    assert F.sign_of_change(None, "away") == 0
    assert (F.sign_of_value(0.2), F.sign_of_value(-1e-9), F.sign_of_value(0.0),
            F.sign_of_value(None)) == (1, -1, 0, 0)


def test_supported_when_beyond_the_band_and_nothing_points_the_other_way():
    inp = F.Inputs(steer_layer=L, first_order={(L, 1): 0.02},
                   steering=[row(1, "away", -0.3, [-0.45, -0.12])],
                   logodds=[logodds(1, "away", -0.5, [-0.8, -0.2])],
                   exact={L: {"latents": [1], "exact_delta": [0.01], "first_order_delta": [0.02],
                              "pairs": 6}})
    f = one(inp, 1)
    assert f["verdict"] == "supported" and f["disagreements"] == []
    assert "-30.0 pp [-45.0, -12.0]" in f["reason"] and "not measured" not in f["reason"]
    # the same without exact Δ and log-odds: still supported, the missing checks named
    bare = F.Inputs(steer_layer=L, steering=[row(1, "away", -0.3, [-0.45, -0.12])])
    assert one(bare, 1)["verdict"] == "supported"
    assert "not measured: first-token log-odds, exact Δ" in one(bare, 1)["reason"]


def test_an_interval_that_excludes_0_but_stays_in_the_band_is_inconclusive():
    inp = F.Inputs(steer_layer=L, steering=[row(1, "away", -0.04, [-0.07, -0.01], beyond=False)])
    f = one(inp, 1)
    assert f["verdict"] == "inconclusive" and "within the random latents' band" in f["reason"]


def test_contradicted_when_steering_moves_the_behaviour_the_other_way():
    inp = F.Inputs(steer_layer=L, first_order={(L, 1): 0.03},
                   steering=[row(1, "toward", -0.2, [-0.31, -0.08]),
                             row(1, "away", 0.01, [-0.05, 0.06])])
    f = one(inp, 1)
    assert f["verdict"] == "contradicted" and "steering toward" in f["reason"]
    assert f["disagreements"] == ["first-order Δ +0.03 says it drives the behaviour, but "
                                  "steering toward at 0.5: -20.0 pp [-31.0, -8.0] says it "
                                  "opposes the behaviour"]


def test_moving_the_other_way_within_the_random_band_is_not_a_contradiction():
    """Random latents can move the behaviour the wrong way too (every nudge lowered the base
    model's rate toward): an interval below 0 toward that stays inside a band below 0 is
    inconclusive; past the band's lower end it contradicts."""
    band = [-0.13, -0.01]
    inside = row(1, "toward", -0.09, [-0.2, -0.01], beyond=False, null_band=band)
    f = one(F.Inputs(steer_layer=L, steering=[inside]), 1)
    assert f["verdict"] == "inconclusive"
    assert f["reason"] == ("steering toward at 0.5: -9.0 pp [-20.0, -1.0] the other way, as "
                           "random latents move it too, is within the random latents' band "
                           "[-13.0, -1.0]; the smallest change it could detect is about 16 pp")
    # 16 = the floor 2.8² / (40 + 2.8²) above 2.8 × (0.19 / 3.92) = 14
    past = row(1, "toward", -0.14, [-0.26, -0.02], beyond=False, null_band=band)
    f = one(F.Inputs(steer_layer=L, steering=[past]), 1)
    assert f["verdict"] == "contradicted"
    assert f["reason"].endswith(": the behaviour moved the other way past the random band")
    away = row(1, "away", 0.04, [0.01, 0.08], beyond=False, null_band=[-0.1, 0.05])
    assert one(F.Inputs(steer_layer=L, steering=[away]), 1)["verdict"] == "inconclusive"
    away["diff"] = 0.06
    assert one(F.Inputs(steer_layer=L, steering=[away]), 1)["verdict"] == "contradicted"
    assert F.past_band_against({"direction": "away", "diff": 0.3})  # no band: the interval rules


def test_directions_that_disagree_are_inconclusive():
    inp = F.Inputs(steer_layer=L, steering=[row(1, "away", -0.3, [-0.4, -0.2]),
                                            row(1, "toward", -0.2, [-0.3, -0.1])])
    f = one(inp, 1)
    assert f["verdict"] == "inconclusive" and f["reason"].startswith("the conditions disagree")


@pytest.mark.parametrize("check", ["logodds", "exact"])
def test_steering_support_against_a_check_is_inconclusive_and_a_disagreement(check):
    inp = F.Inputs(steer_layer=L, first_order={(L, 4881): 0.0283},
                   steering=[row(4881, "away", -0.143, [-0.6, -0.01])])
    if check == "logodds":
        inp.logodds = [logodds(4881, "away", 0.52, [0.08, 0.97])]
    else:
        inp.exact = {L: {"latents": [4881], "exact_delta": [-0.0875],
                         "first_order_delta": [0.0283], "pairs": 2}}
    f = one(inp, 4881)
    assert f["verdict"] == "inconclusive" and "points the other way" in f["reason"]
    if check == "logodds":
        assert "+0.52 [+0.08, +0.97]" in f["reason"]
        assert len(f["disagreements"]) == 2  # against first-order Δ and against steering
    else:
        assert "exact Δ -0.0875" in f["reason"]
        assert ("first-order Δ +0.0283 and exact Δ -0.0875 on the same pairs have opposite "
                "signs") in f["disagreements"]


def test_too_few_pairs_and_the_smallest_detectable_change():
    inp = F.Inputs(steer_layer=L, steering=[row(1, "away", 0.0, [0.0, 0.0], beyond=False,
                                                n_paired=12)])
    f = one(inp, 1)
    assert f["verdict"] == "inconclusive" and f["reason"].startswith("too few decided pairs (12)")
    # a [0, 0] interval on 12 pairs: the floor z²/(n + z²) = 7.84 / 19.84
    assert F.detectable([0.0, 0.0], 12) == pytest.approx(7.84 / 19.84)
    assert "about 40 pp" in f["reason"]
    # from the interval when it is wider: 2.8 × (0.2 − (−0.2)) / 3.92
    assert F.detectable([-0.2, 0.2], 400) == pytest.approx(2.8 * 0.4 / 3.92)
    assert F.detectable(None, None) is None
    many = F.Inputs(steer_layer=L, steering=[row(1, "away", -0.02, [-0.1, 0.06], beyond=False,
                                                 n_paired=80)])
    assert "includes 0 (80 decided pairs)" in one(many, 1)["reason"]


def test_random_latents_are_controls_and_unsteered_latents_get_no_verdict():
    inp = F.Inputs(steer_layer=L, sets={"random": [9]},
                   steering=[row(9, "away", -0.3, [-0.4, -0.2], method="random")],
                   logodds=[logodds(7, "away", -0.2, [-0.3, -0.1])],
                   exact={L: {"latents": [5], "exact_delta": [0.1], "first_order_delta": [0.2],
                              "pairs": 2}})
    by = {f["latent"]: f for f in F.latent_findings(inp)}
    assert by[9]["verdict"] == "control"
    assert by[7]["verdict"] is None and by[5]["verdict"] is None


def test_the_headline_condition_is_the_searched_else_the_largest_strength():
    rows = [row(1, "away", -0.1, [-0.2, 0.0], strength=0.2),
            row(1, "away", -0.3, [-0.4, -0.2], strength=0.8),
            row(1, "away", -0.2, [-0.3, -0.1], strength=0.4, searched=True)]
    assert [r["strength"] for r in F.headlines(rows)] == [0.4]
    assert [r["strength"] for r in F.headlines(rows[:2])] == [0.8]


def test_methods_against_random_and_activation_with_their_power():
    def method(name, first, diffs):
        return [row(first + n, "away", d, [d - 0.1, d + 0.1], method=name)
                for n, d in enumerate(diffs)]

    rows = (method("attribution", 0, (-0.3, -0.25, -0.35)) + method("random", 10, (0.0, 0.02,
                                                                                   -0.02)) +
            method("activation", 20, (-0.4, 0.1, -0.1)))
    out = {(m["method"], m["baseline"]): m for m in F.method_findings(F.Inputs(steering=rows))}
    vs_random = out[("attribution", "random")]
    se = math.sqrt(0.05 ** 2 / 3 + 0.02 ** 2 / 3)  # sample SDs 0.05 and 0.02
    assert vs_random["difference"] == pytest.approx(0.3)
    assert vs_random["se"] == pytest.approx(se)
    assert vs_random["detectable"] == pytest.approx(2.8 * se)
    assert vs_random["result"] == "beat"
    assert out[("attribution", "activation")]["result"] == "no clear difference"
    assert ("activation", "random") in out and ("random", "attribution") not in out
    diffing = method("model-diff", 30, (-0.05, 0.0, -0.1))
    out = {(m["method"], m["baseline"]): m for m in F.method_findings(F.Inputs(
        steering=rows + diffing))}
    assert out[("attribution", "model-diff")]["difference"] == pytest.approx(0.3 - 0.05)
    assert ("model-diff", "random") in out and ("activation", "model-diff") not in out
    one_each = F.compare([0.3], [0.0])
    assert one_each["result"] == "cannot tell" and one_each["se"] is None
    assert F.compare([0.0, 0.0], [0.1, 0.1])["result"] == "worse"


def test_trust_in_rho_with_its_size():
    exact = {L: {"latents": list(range(5)), "exact_delta": [0.5, 0.4, -0.1, 0.2, 0.1],
                 "first_order_delta": [0.6, 0.3, 0.05, 0.2, 0.0], "pairs": [[1, 2], [3, 4]],
                 "spearman": 1.0}}
    (t,) = F.trust(F.Inputs(exact=exact))
    assert (t["latents"], t["pairs"], t["sign_flips"]) == (5, 2, 1)
    assert "only 5 latents" in t["warning"] and "only 2 pairs" in t["warning"]
    lo, hi = F.rho_interval(0.8, 30)
    z, se = math.atanh(0.8), math.sqrt(1.06 / 27)
    assert (lo, hi) == pytest.approx((math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)))
    assert F.rho_interval(0.8, 3) is None
    big = {L: {"latents": list(range(30)), "exact_delta": [1.0] * 30,
               "first_order_delta": [1.0] * 30, "pairs": 6, "spearman": 0.9}}
    assert F.trust(F.Inputs(exact=big))[0]["warning"] is None


def test_findings_json_is_plain_json_with_its_counts():
    inp = F.Inputs(behaviour="b", steer_layer=L, sets={"random": [9]},
                   steering=[row(1, "away", -0.3, [-0.4, -0.2]),
                             row(2, "away", 0.3, [0.2, 0.4]),
                             row(9, "away", 0.0, [-0.1, 0.1], method="random")])
    out = json.loads(json.dumps(F.findings(inp)))
    assert out["verdicts"] == {"supported": 1, "contradicted": 1, "inconclusive": 0,
                               "control": 1}
    assert [f["latent"] for f in out["latents"]] == [1, 2, 9]
    assert out["schema_version"] == 1 and out["rules"]


# -- the findings section of the report ---------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    import test_report as R

    run = tmp_path_factory.mktemp("findings") / "run"
    R.make_attribution(run)
    R.make_explain(run)
    R.make_steering(run)
    rows = [json.loads(x) for x in (run / "steering.jsonl").read_text().splitlines()]
    for r in rows:
        if r["method"] == "attribution":
            r["method"] = f"attribution {R.SCRIPT}"
            r["diff_ci"] = [-0.4, -0.1] if r["direction"] == "away" else [-0.3, -0.1]
            r["diff"] = -0.25 if r["direction"] == "away" else -0.2  # toward: past the band
    R.write_jsonl(run / "steering.jsonl", rows)
    summary = json.loads((run / "steering_summary.json").read_text())
    summary["sets"] = {f"attribution {R.SCRIPT}": [R.RANKED[0]], "random": [R.RANDOM]}
    R.write_json(run / "steering_summary.json", summary)
    R.write_json(run / "rubric.json", {"name": R.IMG, "description": f"Saying {R.SCRIPT}: x"})
    manifest = json.loads((run / "steer" / "manifest.json").read_text())
    R.write_json(run / "steer" / "manifest.json", {**manifest, "rubric": str(run / "rubric.json")})
    return run


def test_the_findings_section_comes_first_escaped_and_written_as_json(hostile_run):
    import test_report as R
    from latentaudit.report import write_report

    page = write_report(hostile_run).read_text(encoding="utf-8")
    for raw in R.HOSTILE:
        assert raw not in page
    sections = [m for m in ("findings", "pipeline", "attribution", "explain", "steering")
                if f'<section id="{m}">' in page]
    assert sections[0] == "findings"
    assert page.index('<section id="findings">') < page.index('<section id="attribution">')
    body = page[page.index('<section id="findings">'):page.index('<section id="attribution">')]
    assert "This run looks for saying &lt;script&gt;" in body
    # latent 5: away supports (beyond), toward contradicts: the conditions disagree
    assert '<span class="verdict inconclusive">inconclusive</span>' in body
    assert "the conditions disagree" in body and "Disagreements (" in body
    assert "Spearman ρ (first-order against exact Δ) <strong>0.80</strong>" in body
    assert "Warning: ρ rests on only 2 latents" in body
    saved = json.loads((hostile_run / "findings.json").read_text())
    assert saved["latents"][0]["method"] == f"attribution {R.SCRIPT}"
    assert saved["latents"][0]["verdict"] == "inconclusive"


def test_the_summary_command_prints_the_findings(hostile_run, capsys):
    from latentaudit.cli import main

    (hostile_run / "findings.json").unlink(missing_ok=True)
    assert main(["report", str(hostile_run), "--summary"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("This run looks for saying <script>")
    assert "Steered latents: 0 supported, 0 contradicted, 1 inconclusive, 1 random controls." \
        in out
    assert ("First-order vs exact Δ, layer 3: Spearman ρ 0.80 (no interval) over 2 latents and "
            "2 pairs") in out
    assert json.loads((hostile_run / "findings.json").read_text())["verdicts"]["control"] == 1


def test_in_chromium_the_findings_section_loads_without_a_console_error(hostile_run, tmp_path):
    import test_report as R
    from latentaudit.report import write_report

    if R.chromium() is None:
        pytest.skip("no Chromium binary on PATH (apt-get install -y chromium)")
    page = write_report(hostile_run, tmp_path / "page.html")
    dom, console = R.browse(page.as_uri() + "#latent-5", tmp_path, "--dump-dom")
    assert console == []
    assert R.root_tag(dom) == '<html lang="en" data-ready="1">'
    findings = dom[dom.index('<section id="findings">'):dom.index('<section id="attribution"')]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in findings and "<script>alert" not in dom
    assert '<table class="data wrap" id="verdicts">' in findings
    opened = dom[dom.index('id="latent-5"'):]
    assert "<h4>Findings</h4>" in opened[:opened.index("</details>")]


def test_exact_delta_sits_beside_the_first_order_one_with_its_sign_flips(tmp_path):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    import test_report as R
    from latentaudit.report import write_report

    run = tmp_path / "run"
    R.make_attribution(run)
    R.make_explain(run)
    # latent 2 flips sign; latent 11 is covered by the exact check but not explained
    R.write_json(run / "explain" / "exact.json", {"schema_version": 1, "layers": {str(L): {
        "latents": [5, 2, 11], "exact_delta": [0.04, -0.03, 0.01],
        "first_order_delta": [0.05, 0.02, 0.02], "pairs": [[1, 2], [3, 4]], "spearman": 0.5}}})
    page = write_report(run).read_text(encoding="utf-8")
    table = page[page.index('id="ranking"'):]
    table = table[:table.index("</table>")]
    rows = {int(i): cells for i, cells in
            re.findall(r'data-latent="(\d+)">(.*?)</tr>', table, flags=re.S)}
    assert 'class="exact">0.04</td>' in rows[5] and "⇄" not in rows[5]
    assert 'class="exact">-0.03 <span class="flip"' in rows[2]  # sorted by the value alone
    assert 'data-v="-0.03" class="exact"' in rows[2]
    assert 'class="exact">0.01</td>' in rows[11]
    explain = page[page.index('<section id="explain">'):]
    # layer, latents, pairs, ρ (the manifest's), no CI on 3 latents, 1 sign flip
    assert "<td>3</td><td>3</td><td>2</td><td>0.8</td><td>–</td><td>1</td>" in explain
    assert "ρ rests on only 3 latents (fewer than 20)" in explain


def test_a_direction_never_steered_has_no_column_and_the_numbers_are_explained(tmp_path):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    import test_report as R
    from latentaudit.report import write_report

    run = tmp_path / "run"
    R.make_attribution(run)
    R.make_steering(run)
    rows = [json.loads(x) for x in (run / "steering.jsonl").read_text().splitlines()]
    R.write_jsonl(run / "steering.jsonl", [r for r in rows if r["direction"] == "away"])
    page = write_report(run).read_text(encoding="utf-8")
    head = page[page.index('id="ranking"'):]
    head = head[:head.index("</thead>")]
    assert 'data-key="away"' in head and 'data-key="toward"' not in head
    assert 'data-key="monitor_auc"' not in head  # no monitor evaluation: no column
    steering = page[page.index('<section id="steering">'):]
    assert "<strong>Rate</strong>: the share of positive replies" in steering
    assert "it can be +0.0 pp while the two rates differ" in steering
    assert '<th data-key="n_paired" data-kind="num"' in steering
    assert R.details(page, f"latent-{R.RANKED[0]}").count(">decided pairs</th>") == 1


def test_the_circuit_says_what_share_its_kept_edges_hold():
    from latentaudit.report.sections.circuit import kept_share

    nodes = [{"attribution_kept": 0.011, "attribution_total": 1.0},
             {"attribution_kept": 0.04, "attribution_total": 2.0}, {"latent": 3}]
    text = kept_share(nodes, {"fraction": 0.8, "max_edges": 5})
    assert text.startswith("The kept edges hold 1.1–2.0% of their target's total |Δ-edge| "
                           "(each target keeps its strongest incoming edges until they hold "
                           "80% of its total or number 5, whichever comes first)")
    assert kept_share([{"latent": 1}], {}) == ""


@pytest.mark.parametrize(("rubric", "sentence"), [
    ("false-belief", "This run looks for undesirable validation of a user's false belief "
                     "(rubric false-belief)"),
    ("broad-misalignment", "This run looks for broad misalignment (rubric broad-misalignment)"),
    ("evil", "This run looks for what rubric evil grades positive (A 1-5 'evil' scale"),
    ("no-such-rubric", None), (None, None)])
def test_the_behaviour_in_one_sentence_from_the_rubric(rubric, sentence):
    from latentaudit.report.sections.findings import behaviour

    got = behaviour(rubric)
    assert got == sentence if sentence is None else got.startswith(sentence)


def test_a_latent_is_described_from_its_top_examples_without_a_model():
    from latentaudit.report.sections.explain import describe_examples

    rows = [{"tokens": ["The", " cat", " sat", " on", "\n", " mat"], "max_index": 5},
            {"tokens": ["a", " mat"], "max_index": 1},
            {"tokens": ["x", " rug"], "max_index": 1},
            {"tokens": ["y"], "max_index": None}]
    assert describe_examples(rows) == ("Peaks on “ mat” (2 of 3), “ rug” (1 of 3); strongest in "
                                       "“… cat sat on↵[ mat]”.")
    assert describe_examples([]) is None


def test_a_description_says_when_no_peak_token_repeats():
    from latentaudit.report.sections.explain import describe_examples

    rows = [{"tokens": ["a", " b"], "max_index": 1, "position": 40},
            {"tokens": [" c"], "max_index": 0, "position": 90},
            {"tokens": [" d", "e"], "max_index": 1, "position": 3}]
    assert describe_examples(rows) == ("Peaks on 3 different tokens, e.g. “ b”, “ c”, “e”; "
                                       "strongest in “…a[ b]”.")


def test_a_description_names_a_latent_that_fires_at_the_start_of_its_sequence():
    from latentaudit.report.sections.explain import EARLY, describe_examples

    def row(tok: str, position: int) -> dict:
        return {"tokens": ["<|endoftext|>", tok], "max_index": 1, "position": position}

    rows = [row("As", 1), row(",", 2), row(",", EARLY - 1), row(" the", 70)]
    assert describe_examples(rows) == (
        f"Fires early in its sequence (3 of 4 examples at positions 1–{EARLY - 1}); peaks on "
        "“,” (2 of 4), “As” (1 of 4), “ the” (1 of 4); strongest in “…<|endoftext|>[As]”.")
    half = [row("As", 1), row(",", 2), row(",", EARLY), row(" the", 70)]
    assert describe_examples(half).startswith("Fires early in its sequence (2 of 4 examples at "
                                              "positions 1–2); ")
    fewer = [row("As", 1), row(",", EARLY), row(",", EARLY + 5), row(" the", 70)]
    assert describe_examples(fewer).startswith("Peaks on “,” (2 of 4)")


def test_a_set_whose_mean_log_odds_points_the_other_way_is_a_disagreement():
    summary = [{"method": "attribution", "direction": "away", "strength": 0.2, "model": "main",
                "mean_logodds_change": 0.24, "mean_logodds_change_ci": [0.05, 0.52]},
               {"method": "activation", "direction": "away", "strength": 0.2, "model": "main",
                "mean_logodds_change": -0.3, "mean_logodds_change_ci": [-0.5, -0.1]},
               {"method": "random", "direction": "away", "strength": 0.2, "model": "main",
                "mean_logodds_change": 0.3, "mean_logodds_change_ci": [0.1, 0.5]}]
    out = F.findings(F.Inputs(summary=summary))
    assert out["set_disagreements"] == [
        "the attribution set's mean first-token log-odds change, steering away at 0.2: +0.24 "
        "[+0.05, +0.52], against the intended direction"]
    assert out["disagreements"] == 1


def test_no_rho_interval_at_plus_or_minus_one():
    assert F.rho_interval(1.0, 5) is None and F.rho_interval(-1.0, 40) is None


def test_a_run_without_steering_or_exactness_has_no_findings_file(tmp_path):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    import test_report as R
    from latentaudit.report import write_findings, write_report

    run = tmp_path / "run"
    R.make_attribution(run)
    (run / "findings.json").write_text("{}")  # left by an earlier sweep, since removed
    page = write_report(run).read_text(encoding="utf-8")
    assert '<section id="findings">' not in page and not (run / "findings.json").exists()
    assert write_findings(run) == (run / "findings.json", None)
