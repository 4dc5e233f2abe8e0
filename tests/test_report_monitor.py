"""The report's monitors section, on a hand-made ``monitor_eval.json`` written by the monitor
stage's own writer (:func:`latentaudit.monitor.report.write_evaluation`).

The AUC table must show each latent set's numbers with their intervals, the ranked-latents table
each latent's AUC; the ROC figure is inlined (``roc.png``, or drawn from the JSON's ROC points);
hostile strings in every text field come out escaped; a bad file is one error naming it.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")

from latentaudit.cli import main  # noqa: E402
from latentaudit.errors import LatentAuditError  # noqa: E402
from latentaudit.monitor.report import RESULTS_FILE, write_evaluation  # noqa: E402
from latentaudit.report import write_report  # noqa: E402
from latentaudit.report.render import ci, fixed  # noqa: E402
from test_report import (  # noqa: E402
    HOSTILE,
    IMG,
    LAYER,
    RANKED,
    SCRIPT,
    browse,
    details,
    elements,
    make_attribution,
    needs_chromium,
    root_tag,
)

GIVEN = 9  # evaluated by id: not in the ranking, gets a drill-down
ACT_ONLY = 13  # in the Δ-activation top K only: no drill-down, no row


def score(auc: float, low: float | None = None, high: float | None = None,
          precision: float = 0.8) -> dict:
    out = {"auc": auc, "precision": precision, "recall": 0.8, "threshold": 0.25}
    return out if low is None else {**out, "ci_low": low, "ci_high": high}


def combo(auc: float, low: float, high: float, precision: float) -> dict:
    return {**score(auc, low, high, precision),
            "roc": {"fpr": [0.0, 0.2, 0.6, 1.0], "tpr": [0.0, 0.6, 0.9, 1.0]}}


def latent(rank: int, i: int, mean: dict, mx: dict, fires: int = 12) -> dict:
    return {"rank": rank, "latent": i, "fires": fires, "mean": mean, "max": mx}


def latent_set(method: str, latents: list[dict], cv: dict, transfer: dict) -> dict:
    return {"method": method, "k": len(latents), "latents": [r["latent"] for r in latents],
            "per_latent": latents,
            "median_auc_mean": statistics.median(r["mean"]["auc"] for r in latents),
            "median_auc_max": statistics.median(r["max"]["auc"] for r in latents),
            "combination": {"cv": cv, "transfer": transfer}}


def results() -> dict:
    """A monitor evaluation with every field the writer writes, hostile text in each string."""
    top = [latent(1, RANKED[0], score(0.81, 0.62, 0.93, 0.9), score(0.74, 0.55, 0.9)),
           latent(2, RANKED[1], score(0.35, 0.2, 0.48), score(0.52, 0.4, 0.66), fires=0)]
    act = [latent(1, ACT_ONLY, score(0.66, 0.51, 0.8), score(0.6, 0.45, 0.75)),
           latent(2, RANKED[0], score(0.81, 0.62, 0.93, 0.9), score(0.74, 0.55, 0.9))]
    draws = [latent_set("random", [latent(1, 3, score(0.5), score(0.5), fires=f),
                                   latent(2, 4, score(0.55), score(0.45), fires=1)],
                        combo(auc, 0.3, 0.7, 0.7), combo(auc + 0.1, 0.3, 0.8, 0.75))
             for auc, f in ((0.4, 0), (0.6, 5))]
    counts = {"path": f"held {SCRIPT}.jsonl", "sha256": IMG, "completions": 20, "positive": 15,
              "negative": 5, "excluded": 2, "prompts": 6}
    return {
        "schema_version": 1, "stage": "monitor-evaluate", "model": f"tiny {SCRIPT}",
        "d_model": 8, "layer": LAYER, "sae": {"path": IMG, "digest": SCRIPT, "d_sae": 16},
        "run": f"run {IMG}",
        "config": {"top_k": [2], "recall": 0.8, "folds": 3, "bootstrap": 200, "level": 0.95,
                   "random_draws": 2, "seed": 0, "batch_size": 8, "note": IMG},
        "sets": [latent_set("Δ-attribution", top, combo(0.77, 0.61, 0.88, 0.91),
                            combo(0.83, 0.7, 0.94, 0.95)),
                 latent_set("Δ-activation", act, combo(0.7, 0.55, 0.85, 0.9),
                            combo(0.72, 0.6, 0.86, 0.92)),
                 *draws,
                 latent_set("given", [latent(1, GIVEN, score(0.58, 0.45, 0.7), score(0.6))],
                            combo(0.58, 0.45, 0.7, 0.8), combo(0.6, 0.5, 0.7, 0.81))],
        "probe": {"cv": combo(0.94, 0.9, 0.98, 0.99), "transfer": combo(0.97, 0.91, 1.0, 1.0)},
        "counts": counts, "train_counts": {**counts, "path": f"train {IMG}.jsonl",
                                           "completions": 40, "positive": 30, "negative": 10},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("monitor-report") / "run"
    make_attribution(run)
    (run / "monitor-eval").mkdir()
    write_evaluation(run / "monitor-eval", results())
    return run


@pytest.fixture(scope="module")
def page(run) -> str:
    return write_report(run).read_text(encoding="utf-8")


def section(page: str) -> str:
    start = page.index('<section id="monitor">')
    return page[start:page.index("</section>", start)]


def cells(page: str, table_id: str) -> list[list[str]]:
    """The text of each body cell of a table, row by row (tags dropped, entities decoded)."""
    start = page.index(f'id="{table_id}"')
    body = page[page.index("<tbody>", start):page.index("</tbody>", start)]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def test_the_auc_table_shows_every_set_with_its_numbers_and_intervals(page):
    head = section(page)[:section(page).index("<tbody>")]
    assert "combination AUC, CV [95% CI]" in head
    assert "precision @ recall 0.8 (fit on training file)" in head
    assert cells(page, "monitor-auc") == [
        ["Δ-attribution top-2", "2", "1", "1 / 1", f"{RANKED[0]}: 0.81 [0.62, 0.93]",
         "0.58 / 0.63", "0.77 [0.61, 0.88]", "0.91", "0.83 [0.70, 0.94]", "0.95"],
        ["Δ-activation top-2", "2", "2", "2 / 0", f"{ACT_ONLY}: 0.66 [0.51, 0.80]",
         "0.74 / 0.67", "0.70 [0.55, 0.85]", "0.90", "0.72 [0.60, 0.86]", "0.92"],
        ["random (2 draws)", "2", "1.5", "–", "–", "0.53 / 0.47",
         "0.50 (draws 0.40–0.60)", "0.70", "0.60 (draws 0.50–0.70)", "0.75"],
        ["given latents", "1", "1", "0 / 0", f"{GIVEN}: 0.58 [0.45, 0.70]", "0.58 / 0.60",
         "0.58 [0.45, 0.70]", "0.80", "0.60 [0.50, 0.70]", "0.81"],
        ["residual probe (mean residual)", "8", "–", "–", "–", "–", "0.94 [0.90, 0.98]", "0.99",
         "0.97 [0.91, 1.00]", "1.00"]]
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", section(page))))
    assert re.search(r"20 completions of 6 prompts 15 positive 5 negative 2 excluded", text)
    assert "40 completions of 6 prompts 30 positive 10 negative" in text
    assert "flags everything has precision 0.75" in text
    assert "200 resamples" in text


def test_each_latent_has_its_auc_in_the_ranked_table_and_a_drilldown(page):
    head = page[page.index('id="ranking"'):page.index("</thead>", page.index('id="ranking"'))]
    assert 'data-key="monitor_auc" data-kind="auc" data-first="desc"' in head
    column = head.count("<th ") - 1
    rows = {int(r[2]): r[column] for r in cells(page, "ranking")}
    assert rows == {RANKED[0]: "0.81 [0.62, 0.93]", RANKED[1]: "0.35 [0.20, 0.48]",
                    RANKED[2]: "–", GIVEN: "0.58 [0.45, 0.70]"}
    assert f'data-latent="{GIVEN}"' in page and f'id="latent-{ACT_ONLY}"' not in page
    best = details(page, f"latent-{RANKED[0]}")
    assert "monitor AUC 0.81" in best and "As a monitor" in best
    assert "Selected by Δ-attribution (rank 1), Δ-activation (rank 2)" in best
    part = best[best.index("As a monitor"):]
    assert "<td>mean activation</td><td class=\"num\">0.81</td><td class=\"num\">[0.62, 0.93]" \
        in part
    assert "<td>max activation</td><td class=\"num\">0.74</td><td class=\"num\">[0.55, 0.90]" \
        in part
    listed = {int(r[0]): r for r in cells(page, "monitor-latents")}
    assert set(listed) == {RANKED[0], RANKED[1], ACT_ONLY, GIVEN}
    assert listed[RANKED[1]][2] == "0 of 20" and listed[ACT_ONLY][3] == "0.66 [0.51, 0.80]"
    assert f'href="#latent-{ACT_ONLY}"' not in page  # no link to a latent the page lacks


def test_every_text_field_comes_out_escaped(page):
    for raw in HOSTILE:
        assert raw not in page
    mine = section(page)
    assert "tiny &lt;script&gt;alert(1)&lt;/script&gt;" in mine
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in mine
    assert "held &lt;script&gt;" in mine and "train &#34;&gt;&lt;img" in mine
    parsed = elements(page)
    assert [t for t, _ in parsed.tags].count("script") == 1
    for tag, attrs in parsed.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")


def figure_src(page: str) -> str:
    return re.search(r'<img src="([^"]+)" alt="ROC curves', section(page))[1]


def test_the_roc_figure_is_inlined_or_drawn_from_the_json(run, page, tmp_path):
    png = (run / "monitor-eval" / "roc.png").read_bytes()
    assert figure_src(page) == "data:image/png;base64," + base64.b64encode(png).decode()
    folder = tmp_path / "eval"
    folder.mkdir()
    shutil.copy(run / "monitor-eval" / RESULTS_FILE, folder)
    drawn = write_report(run, tmp_path / "r.html", monitor=folder).read_text(encoding="utf-8")
    src = figure_src(drawn)
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "Drawn from <code>monitor_eval.json</code>" in section(drawn)


def test_the_section_is_left_out_without_its_file(run, tmp_path):
    bare = tmp_path / "run"
    make_attribution(bare)
    text = write_report(bare).read_text(encoding="utf-8")
    assert 'id="monitor"' not in text and "monitor AUC" not in text
    text = write_report(run, tmp_path / "r.html", monitor=tmp_path).read_text(encoding="utf-8")
    assert 'id="monitor"' not in text


def test_the_command_reads_the_folder_given_by_monitor(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run / "monitor-eval", elsewhere)
    bare = tmp_path / "run"
    make_attribution(bare)
    out = tmp_path / "r.html"
    assert main(["report", str(bare), "--out", str(out), "--monitor", str(elsewhere)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert 'id="monitor"' in out.read_text(encoding="utf-8")


def broken(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / f"eval{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / RESULTS_FILE).write_text(text, encoding="utf-8")
    return folder


def test_a_bad_file_is_one_error_naming_it_and_its_field(run, tmp_path):
    with pytest.raises(LatentAuditError, match=r"monitor_eval.json: not valid JSON .*"
                                               r"latentaudit monitor evaluate"):
        write_report(run, tmp_path / "r.html", monitor=broken(tmp_path, '{"sets": ['))
    good = results()
    for change, field in ((lambda r: r["sets"][0].pop("combination"), r"sets\[0\].combination"),
                          (lambda r: r["probe"]["cv"].pop("roc"), r"probe.cv.roc"),
                          (lambda r: r["sets"][1]["per_latent"][0].update(latent="7"),
                           r"sets\[1\].per_latent\[0\].latent' must be a latent id"),
                          (lambda r: r["sets"][2]["combination"]["cv"].update(auc="high"),
                           r"sets\[2\].combination.cv.auc' is 'high', not a number"),
                          (lambda r: r.update(schema_version=2), "schema_version' is 2"),
                          (lambda r: r.pop("counts"), "counts' is missing")):
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(LatentAuditError, match=rf"monitor_eval.json: field '{field}"):
            write_report(run, tmp_path / "r.html", monitor=broken(tmp_path, json.dumps(bad)))


def test_an_evaluation_of_another_layer_is_shown_but_not_matched(run, tmp_path):
    other = results()
    other["layer"] = LAYER + 1
    folder = broken(tmp_path, json.dumps(other))
    text = write_report(run, tmp_path / "r.html", monitor=folder).read_text(encoding="utf-8")
    assert "not matched to the ranked-latents table" in section(text)
    assert f'id="latent-{GIVEN}"' not in text and "As a monitor" not in text


def test_the_section_reads_the_schema_the_writer_writes():
    from latentaudit.monitor.evaluate import SCHEMA_VERSION
    from latentaudit.report.sections import monitor

    assert monitor.SCHEMA_VERSION == SCHEMA_VERSION


def test_two_decimal_format():
    assert fixed(0.5) == "0.50" and fixed(None) == "–" and fixed(float("nan")) == "–"
    assert ci([0.1, 0.934], "fixed") == "[0.10, 0.93]"


@needs_chromium
def test_in_chromium_the_table_sorts_by_monitor_auc(run, page, tmp_path):
    report = run / "report.html"
    dom, console = browse(f"{report.as_uri()}#sort=monitor_auc", tmp_path, "--dump-dom")
    assert console == [] and root_tag(dom) == '<html lang="en" data-ready="1">'
    table = dom[dom.index('<table class="sortable" id="ranking"'):]
    table = table[:table.index("</table>")]
    order = [int(x) for x in re.findall(r'<tr data-i="\d+" data-latent="(\d+)"', table)]
    assert order == [RANKED[0], GIVEN, RANKED[1], RANKED[2]]  # no value sorts last
