"""`latentaudit report`: one self-contained HTML page of a run.

A hand-made run (every stage's files, written from small dicts) puts two hostile strings in every
text field a run can hold: model and corpus text must come out escaped, nothing may load from
anywhere, and in a real headless Chromium (Debian's `chromium`, skipped where absent) the page
loads without console errors, sorts its table from the address, opens a latent's drill-down and
renders a non-blank screenshot. One slow test renders a run made by the real stages on a tiny
model.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")

from latentaudit.cli import main  # noqa: E402
from latentaudit.data.corpus import NLP_CORPUS_WARNING  # noqa: E402
from latentaudit.errors import LatentAuditError, MissingPackageError  # noqa: E402
from latentaudit.report import write_report  # noqa: E402
from latentaudit.report.context import sort_value  # noqa: E402
from latentaudit.report.figures import spearman  # noqa: E402
from latentaudit.report.highlight import spans, style  # noqa: E402
from latentaudit.report.render import ci, num, pp  # noqa: E402

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
HOSTILE = (SCRIPT, IMG)
D_SAE = 16
LAYER = 3
RANKED = [5, 2, 11]
RANDOM = 9  # steered as a random latent: not in the ranking


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def png(path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(path)


def make_attribution(run: Path) -> dict:
    from safetensors.numpy import save_file

    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    attribution = rng.normal(size=D_SAE).astype(np.float32) * 1e-3
    activation = rng.normal(size=D_SAE).astype(np.float32)
    for n, i in enumerate(RANKED):
        attribution[i] = 0.05 - 0.01 * n
    save_file({"delta_attribution": attribution, "delta_activation": activation},
              str(run / "attribution.safetensors"))
    write_json(run / "manifest.json", {
        "schema_version": 1, "stage": "attribute",
        "model": {"name": f"tiny {SCRIPT}", "path": IMG, "d_model": 8, "dtype": "float32"},
        "saes": {str(LAYER): {"path": "sae", "format": "latentaudit", "d_sae": D_SAE,
                              "activation": "topk", "k": 4}},
        "layers": [LAYER], "hook": "resid_post", "abar_source": {str(LAYER): "sae"},
        "dataset": {"path": f"data {IMG}.jsonl", "sha256": "0" * 64},
        "counts": {"completions": 4, "pairs": 4, "prompts": 2, "tokens": 40},
        "options": {"batch_size": 8, "note": SCRIPT}, "versions": {"latentaudit": "0.1.0"}})
    write_jsonl(run / "ranking.jsonl", [
        {"layer": LAYER, "latent": i, "rank": n + 1, "delta_attribution": float(attribution[i]),
         "delta_activation": float(activation[i]), "delta_activation_rank": 1,
         "logit_lens_top_tokens": [" yes", SCRIPT, IMG, "\n"]} for n, i in enumerate(RANKED)])
    return {"attribution": attribution, "activation": activation}


def explained_row(i: int, rank: int | None) -> dict:
    tokens = ["The", " cat", SCRIPT, IMG, " sat"]
    return {
        "layer": LAYER, "latent": i, "rank": rank, "final_rank": rank,
        "delta_attribution": 0.05, "delta_activation": 0.1, "exact_delta": 0.04,
        "first_order_delta": 0.05,
        "logit_lens": {"cosine": [SCRIPT, " ok"], "through_final_norm": False,
                       "promoted": [{"token": IMG, "token_id": 1, "value": 2.0}],
                       "suppressed": [{"token": SCRIPT, "token_id": 2, "value": -2.0}]},
        "density": {"tokens": 1000, "fired": 30, "frequency": 0.03,
                    "histogram": [0] * 10 + [10, 15, 5] + [0] * 17},
        "top_examples": [{"activation": 3.0 - k, "sequence": k, "position": 2, "max_index": 2,
                          "token_ids": [1, 2, 3, 4, 5], "tokens": tokens,
                          "activations": [0.0, 1.0, 3.0 - k, 0.5, 0.0]} for k in range(2)],
        "attribution_map": {"mean_positive": 0.2, "mean_negative": -0.1, "top_tokens": [
            {"completion": 0, "line": 1, "position": 3, "token": IMG, "delta": 0.3}]},
        "explanation": f"fires on {SCRIPT}",
        "output_effect": {"strength": 0.2, "alpha": 3.0, "completions": [1, 2], "positions": 9,
                          "route": "upper-layers",
                          "added": {"rises": [{"token": SCRIPT, "token_id": 2, "value": 0.7}],
                                    "falls": [{"token": " dog", "token_id": 3, "value": -0.5}]},
                          "ablated": {"rises": [{"token": " mat", "token_id": 4, "value": 0.1}],
                                      "falls": [{"token": IMG, "token_id": 1, "value": -0.2}]}}}


def make_explain(run: Path, corpus: str = "nlp-corpus") -> None:
    from safetensors.numpy import save_file

    out = run / "explain"
    explained = RANKED[:2]
    write_json(out / "manifest.json", {
        "schema_version": 1, "stage": "explain", "run": str(run), "model": "tiny",
        "layers": [LAYER], "latents": [{"layer": LAYER, "latent": i} for i in explained],
        "corpus": {"spec": corpus, "tokens": 1000, "sequences": 10, "content_warnings": []},
        "density_histogram_edges": np.logspace(-3, 3, 31).tolist(),
        "map_columns": [{"layer": LAYER, "latent": i} for i in explained],
        "exactness": {str(LAYER): {"route": "upper-layers", "pairs": 2, "spearman": 0.8,
                                   "spearman_per_completion_mean": 0.7}},
        "options": {"rescore": 0}})
    write_jsonl(out / "latents.jsonl", [explained_row(i, n + 1) for n, i in enumerate(explained)])
    completions = [["<|user|>", "Q", "<|assistant|>", SCRIPT, " ok"],
                   ["<|user|>", "Q", "<|assistant|>", IMG]]
    rows, deltas, offset = [], [], 0
    for c, tokens in enumerate(completions):
        d = np.linspace(-1, 1, len(tokens) * 2, dtype=np.float32).reshape(len(tokens), 2)
        deltas.append(d)
        rows.append({"index": c, "line": c + 1, "prompt_id": f"p{c}", "label": "positive",
                     "weight": 0.5, "offset": offset, "n_tokens": len(tokens),
                     "n_prompt_tokens": 3, "tokens": tokens, "loss": 1.0,
                     "delta": d.sum(0).tolist()})
        offset += len(tokens)
    write_jsonl(out / "completions.jsonl", rows)
    save_file({"token_delta": np.concatenate(deltas), "token_ids": np.zeros(offset, np.int64),
               "offsets": np.array([0, 5, 9], np.int64),
               "layers": np.array([LAYER, LAYER], np.int64),
               "latents": np.array(explained, np.int64)}, str(out / "token_maps.safetensors"))
    write_json(out / "exact.json", {"schema_version": 1, "layers": {str(LAYER): {
        "latents": explained, "exact_delta": [0.04, 0.03], "first_order_delta": [0.05, 0.02],
        "spearman": 0.8}}})


def make_steering(run: Path) -> None:
    steered = [RANKED[0], RANDOM]
    rows = []
    for i, method in zip(steered, ("attribution", "random"), strict=True):
        for direction, diff in (("away", -0.25), ("toward", 0.5)):
            rows.append({"method": method, "latents": [i], "direction": direction,
                         "strength": 0.5, "alpha": 1.0, "model": "main", "searched": False,
                         "n": 4, "rate": 0.5, "rate_ci": [0.2, 0.8], "base_rate": 0.5,
                         "diff": diff if method != "random" else 0.0, "diff_ci": [-0.5, 0.5],
                         "n_paired": 4, "incoherence": 0.1, "logodds_change": 0.2,
                         "logodds_change_ci": [0.1, 0.3], "null_band": [0.0, 0.0],
                         "beyond_null": method != "random"})
    write_jsonl(run / "steering.jsonl", rows)
    write_json(run / "steering_summary.json", {
        "schema_version": 1, "resid_norm": 3.5, "sets": {"attribution": [RANKED[0]],
                                                          "random": [RANDOM]},
        "summary": [{"method": "attribution", "direction": "away", "strength": 0.5,
                     "model": "main", "searched": False, "latents": 1, "mean_diff": -0.25,
                     "beyond_null": 1, "null_band": [0.0, 0.0], "mean_logodds_change": 0.2,
                     "mean_incoherence": 0.1}]})
    write_jsonl(run / "steering_logodds.jsonl", [
        {"key": f"{RANKED[1]}/away/0.5", "method": "ranking", "latents": [RANKED[1]],
         "direction": "away", "strength": 0.5, "model": "main", "change": -0.3,
         "ci": [-0.4, -0.2], "n_prompts": 2}])
    write_json(run / "steer" / "manifest.json", {"model": "tiny", "layer": LAYER,
                                                 "prompt_ids": [IMG, "p2"], "config": {"n": 2}})
    units = [(IMG, 0), ("p2", 0)]
    keys = ["base"] + [f"{i}/{d}/0.5" for i in steered for d in ("away", "toward")]
    write_jsonl(run / "steer" / "completions.jsonl", [
        {"key": k, "prompt_id": p, "sample_index": s, "completion": f"{k}: {SCRIPT} {IMG}"}
        for k in keys for p, s in units])
    write_jsonl(run / "steer" / "judged.jsonl", [
        {"key": k, "prompt_id": p, "sample_index": s,
         "outcome": "positive" if k == "base" else "negative", "why": f"why {IMG}",
         "incoherent": False} for k in keys for p, s in units])
    png(run / "steering_away.png")


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    make_attribution(run)
    make_explain(run)
    make_steering(run)
    return run


@pytest.fixture(scope="module")
def page(hand_run) -> str:
    return write_report(hand_run).read_text(encoding="utf-8")


class Elements(HTMLParser):
    """Every start tag and its attributes, and the text of each script element."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def elements(text: str) -> Elements:
    parser = Elements()
    parser.feed(text)
    return parser


# -- the page as text ------------------------------------------------------------------------

def test_model_and_corpus_text_is_escaped(page):
    for raw in HOSTILE:
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    parsed = elements(page)
    assert [t for t, _ in parsed.tags].count("script") == 1
    for tag, attrs in parsed.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")


def test_the_page_fetches_nothing_and_allows_only_its_own_script(page):
    parsed = elements(page)
    for tag, attrs in parsed.tags:
        for name in ("src", "href", "action", "data"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:|//|file:|ftp:)", value, re.I), (tag, attrs)
        assert tag not in ("link", "iframe", "object", "embed", "base")
    csp = next(a["content"] for t, a in parsed.tags
               if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    digest = base64.b64encode(hashlib.sha256(parsed.scripts[0].encode()).digest()).decode()
    assert "default-src 'none'" in csp and f"script-src 'sha256-{digest}'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


def details(page: str, latent_id: str) -> str:
    start = page.index(f'id="{latent_id}"')
    return page[start:page.index("</details>", start)]


def test_every_section_and_drilldown_is_there(page):
    for anchor in ('id="attribution"', 'id="explain"', 'id="steering"', 'id="ranking"'):
        assert anchor in page
    for i in [*RANKED, RANDOM]:
        assert f'<details class="latent" id="latent-{i}"' in page
    # the random latent is a table row without a rank, marked with its selection method
    row = page[page.index(f'data-latent="{RANDOM}"', page.index('id="ranking"')):]
    row = row[:row.index("</tr>")]
    assert "random" in row and 'data-v=""' in row
    best = details(page, f"latent-{RANKED[0]}")
    assert "Top-activating examples" in best and "Attribution map" in best
    assert "Steered away" in best and "unsteered twin" in best
    assert html.escape(f"{RANKED[0]}/away/0.5: {SCRIPT}", quote=True) in best
    assert 'style="background-color:rgba(' in best
    # figures: the scatter, the exactness check, the sweep's own
    assert "Spearman ρ" in page and page.count("data:image/png;base64,") == 3


def test_the_corpus_content_warning_stands_where_its_text_does(page):
    warning = html.escape(NLP_CORPUS_WARNING, quote=True)
    for i in RANKED[:2]:  # the explained latents show nlp-corpus examples
        part = details(page, f"latent-{i}")
        assert part.index(warning) < part.index('<ol class="examples">')
    assert warning not in details(page, f"latent-{RANKED[2]}")  # no corpus text there
    assert page.count(warning) == 3  # and once in the explain section


def test_content_warnings_come_from_the_corpus_module():
    from latentaudit.report.sections.explain import warnings

    assert NLP_CORPUS_WARNING in warnings({"spec": "held-out", "content_warnings": []})
    assert warnings({"spec": "notes.txt", "content_warnings": ["w"]}) == ["w"]
    assert warnings({"spec": "nlp-corpus", "content_warnings": [NLP_CORPUS_WARNING]}) == \
        [NLP_CORPUS_WARNING]


def test_token_maps_that_disagree_with_their_completions_are_named(hand_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hand_run, run)
    rows = [json.loads(x) for x in (run / "explain" / "completions.jsonl").read_text()
            .splitlines()]
    rows[1]["n_tokens"] += 1
    write_jsonl(run / "explain" / "completions.jsonl", rows)
    with pytest.raises(LatentAuditError, match=r"completions.jsonl: row 2 does not match"):
        write_report(run)


def test_sections_without_files_are_left_out(tmp_path):
    run = tmp_path / "run"
    make_attribution(run)
    text = write_report(run, tmp_path / "only.html").read_text(encoding="utf-8")
    assert 'id="attribution"' in text and 'id="explain"' not in text
    assert 'id="steering"' not in text and text.count('<details class="latent"') == 3
    assert NLP_CORPUS_WARNING not in text


def test_a_run_folder_without_its_files_is_one_clear_error(tmp_path):
    with pytest.raises(LatentAuditError, match="no such run folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(LatentAuditError, match="has no manifest.json; pass the --out folder"):
        write_report(tmp_path)
    run = tmp_path / "run"
    make_attribution(run)
    (run / "ranking.jsonl").write_text('{"layer": 3, "latent": 1}\n{"layer": 3,\n')
    with pytest.raises(LatentAuditError, match=r"ranking.jsonl:1: field 'rank' is missing"):
        write_report(run)
    (run / "ranking.jsonl").write_text('{"layer": 3, "latent": 99, "rank": 1}\n')
    with pytest.raises(LatentAuditError, match="latent 99"):
        write_report(run)
    (run / "manifest.json").write_text('{"model": {}}')
    with pytest.raises(LatentAuditError, match="field 'saes' is missing"):
        write_report(run)


def test_the_command_writes_the_page_and_prints_its_path(hand_run, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(hand_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(hand_run / "explain", elsewhere / "explain")
    assert main(["report", str(hand_run), "--out", str(out), "--explain", str(tmp_path / "x"),
                 "--steering", str(tmp_path / "x")]) == 0
    assert 'id="explain"' not in out.read_text(encoding="utf-8")
    assert main(["report", str(hand_run), "--out", str(out), "--explain",
                 str(elsewhere / "explain")]) == 0
    assert 'id="explain"' in out.read_text(encoding="utf-8")


def test_a_missing_package_is_one_error_that_says_what_to_install(hand_run, monkeypatch,
                                                                   capsys):
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(MissingPackageError, match=r'pip install "latentaudit\[report\]"'):
        write_report(hand_run)
    assert main(["report", str(hand_run)]) == 2
    assert 'latentaudit[report]' in capsys.readouterr().err


def test_write_report_is_exported_lazily_and_report_is_not():
    import latentaudit

    assert latentaudit.write_report is write_report
    assert "report" not in latentaudit.__all__


# -- pieces ----------------------------------------------------------------------------------

def test_highlight_styles_hold_numbers_only():
    assert style(0.5, 1.0) == "background-color:rgba(214,39,40,0.425)"
    assert style(-2.0, 1.0) == "background-color:rgba(31,119,180,0.850)"
    assert style(0.0, 1.0) == style(None, 1.0) == style(1.0, 0.0) == style(float("nan"), 1) == ""
    out = spans(["a", SCRIPT], [1.0, -1.0], 2.0, mark=1, prompt=1)
    assert out[1]["text"] == SCRIPT and out[1]["mark"] and out[0]["prompt"]
    assert re.fullmatch(r"background-color:rgba\([\d,.]+\)", out[0]["style"])


def test_number_formats_and_sort_values():
    assert num(None) == "–" and num(3) == "3" and num(0.012345) == "0.0123"
    assert num(1.5e-5) == "1.50e-05" and pp(-0.125) == "-12.5 pp"
    assert ci([0.1, 0.2], "pp") == "[+10.0 pp, +20.0 pp]" and ci(None) == "–"
    assert sort_value(None) == "" and sort_value(2) == "2.0" and sort_value(float("nan")) == ""
    assert sort_value({"value": -0.5, "beyond": True}) == "-0.5"
    assert sort_value([" a", "b"]) == " a b"


def test_spearman_with_ties_equals_the_pearson_of_average_ranks():
    x = np.array([1.0, 2.0, 2.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4, 3, 5])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman(x[:2], y[:2]) is None


# -- in a real headless Chromium ----------------------------------------------------------------

def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)


needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) "
    "on PATH: install Debian's `chromium` (apt-get install -y chromium; .ci/run does) to run "
    "the browser tests")


def browse(url: str, tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    """(stdout, console messages) of one headless Chromium run on ``url``, with no network."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-proxy-server",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LANG": "C.UTF-8"})
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, console


def root_tag(dom: str) -> str:
    return re.search(r"<html\b[^>]*>", dom)[0]


@needs_chromium
def test_in_chromium_the_page_loads_offline_sorts_and_opens_a_drilldown(hand_run, page, tmp_path):
    report = hand_run / "report.html"
    target = RANKED[2]
    dom, console = browse(f"{report.as_uri()}?sort=delta_activation:asc#latent-{target}",
                          tmp_path, "--dump-dom")
    assert console == []
    assert root_tag(dom) == '<html lang="en" data-ready="1">'  # the script ran, no error
    table = dom[dom.index('<table class="sortable" id="ranking"'):]
    table = table[:table.index("</table>")]
    assert 'data-sort-key="delta_activation"' in table and 'data-sort-dir="asc"' in table
    assert 'data-key="delta_activation" data-kind="num" data-first="desc" title=' in table
    order = [int(x) for x in re.findall(r'<tr data-i="\d+" data-latent="(\d+)"', table)]
    from safetensors.numpy import load_file

    activation = load_file(str(hand_run / "attribution.safetensors"))["delta_activation"]
    assert sorted(order) == sorted([*RANKED, RANDOM])
    assert order == sorted(order, key=lambda i: activation[i])
    opened = re.findall(r'<details class="latent" id="(latent-\d+)"[^>]* open=""', dom)
    assert opened == [f"latent-{target}"]


@needs_chromium
def test_in_chromium_hostile_text_runs_nothing_even_without_the_csp(page, tmp_path):
    """Escaping alone must hold: the page without its Content-Security-Policy, and with an
    alert hook, shows the strings as text and creates no element from them."""
    hook = ("<script>window.alert = function () { document.documentElement"
            ".setAttribute('data-alerted', '1'); };</script>")
    bare = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', hook, page)
    assert bare != page
    path = tmp_path / "bare.html"
    path.write_text(bare, encoding="utf-8")
    dom, console = browse(path.as_uri(), tmp_path, "--dump-dom")
    assert console == [] and root_tag(dom) == '<html lang="en" data-ready="1">'  # no alert
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert imgs and all('src="data:image/png;base64,' in tag for tag in imgs)
    assert dom.count("<script") == 2  # the hook and the page's own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


@needs_chromium
def test_in_chromium_a_screenshot_is_not_blank(hand_run, page, tmp_path):
    shot = tmp_path / "shot.png"
    _, console = browse((hand_run / "report.html").as_uri(), tmp_path,
                        f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    assert console == []
    assert shot.is_file() and shot.stat().st_size > 20_000
    try:
        from PIL import Image, ImageStat
    except ImportError:
        return
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        assert ImageStat.Stat(im.convert("L")).var[0] > 100


# -- on the real stages ------------------------------------------------------------------------

@pytest.mark.slow
def test_report_of_a_run_made_by_the_real_stages(tiny_model_dir, tmp_path):
    from test_steer import SWEEP_PROMPTS
    from tiny import random_sae

    random_sae(32, 48, layer=1).save(tmp_path / "sae")
    lines = (Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl") \
        .read_text().splitlines(keepends=True)[:8]
    first = json.loads(lines[0])
    first["completion"] = f"Sure {SCRIPT} {IMG}"
    lines[0] = json.dumps(first) + "\n"
    (tmp_path / "data.jsonl").write_text("".join(lines))
    run = tmp_path / "run"
    assert main(["attribute", "--model", str(tiny_model_dir), "--sae", str(tmp_path / "sae"),
                 "--data", str(tmp_path / "data.jsonl"), "--out", str(run), "--top-k", "6",
                 "--device", "cpu"]) == 0
    (tmp_path / "corpus.txt").write_text(f"Water boils at one hundred degrees. {SCRIPT} " * 30)
    assert main(["explain", "--from", str(run), "--corpus", str(tmp_path / "corpus.txt"),
                 "--corpus-tokens", "400", "--context-len", "40", "--top-k", "2",
                 "--examples", "2", "--exact-pairs", "2", "--map-pairs", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    write_jsonl(tmp_path / "prompts.jsonl", SWEEP_PROMPTS[2:5])
    write_json(tmp_path / "rules.json", {"rubric": "false-belief", "questions": {
        "validation": {"rules": [{"answer": "VALIDATES", "patterns": ["[a-m]"]}],
                       "default": "CORRECTS"},
        "coherent": {"rules": [{"answer": 0, "patterns": ["(.)\\1\\1"]}], "default": 100}}})
    rules = f"rules:{tmp_path / 'rules.json'}"
    assert main(["steer", "--from", str(run), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--judge", rules, "--coherence-judge", rules, "--top-k", "1", "--n", "1",
                 "--strengths", "4", "--max-new-tokens", "4", "--n-boot", "100",
                 "--methods", "attribution,random", "--device", "cpu"]) == 0
    text = write_report(run).read_text(encoding="utf-8")
    for raw in HOSTILE:
        assert raw not in text
    for anchor in ('id="attribution"', 'id="explain"', 'id="steering"'):
        assert anchor in text
    ranking = [json.loads(x) for x in (run / "ranking.jsonl").read_text().splitlines()]
    top = details(text, f"latent-{ranking[0]['latent']}")
    assert "Top-activating examples" in top and 'class="maps"' in top
    assert "Steered away" in top and "unsteered twin" in top
    assert text.count('<details class="latent"') >= len(ranking)


def test_the_output_effect_stands_in_the_latent_drilldown(page):
    part = details(page, f"latent-{RANKED[0]}")
    for label in ("adding raises", "adding lowers", "ablating raises", "ablating lowers"):
        assert label in part
    assert "over 9 reply positions of 2 of the run" in part
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in part and "&lt;img" in part
    assert part.index(" dog") > part.index("adding raises") and " mat" in part
    assert "adding raises" not in details(page, f"latent-{RANKED[2]}")  # not explained
