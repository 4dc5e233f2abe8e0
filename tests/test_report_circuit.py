"""The circuit section of the report: a hand-made circuit.json with hostile strings in every text
field is drawn as an inline SVG with escaped text and no new script; its nodes, edges, panels and
drill-downs are there; a bad file is one clear error; and in a real headless Chromium (skipped
where absent) selecting a node from the address shows its panel and edges."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")

from latentaudit.cli import main  # noqa: E402
from latentaudit.errors import LatentAuditError  # noqa: E402
from latentaudit.report import write_report  # noqa: E402
from latentaudit.report.sections.circuit import layout  # noqa: E402
from test_report import (  # noqa: E402
    HOSTILE,
    IMG,
    LAYER,
    RANKED,
    SCRIPT,
    browse,
    elements,
    make_attribution,
    needs_chromium,
    root_tag,
)

UP = 1
UPSTREAM = [7, 3, 12]


def node(layer: int, latent: int, **kw) -> dict:
    return {"id": f"{layer}:{latent}", "layer": layer, "latent": latent,
            "role": "target" if layer == LAYER else "upstream", "rank": None,
            "delta_attribution": 0.01 * (latent % 5 - 2), "attribution_total": None,
            "attribution_kept": None, "logit_lens": [SCRIPT, f" tok{latent}", IMG],
            "top_examples": None, **kw}


def circuit_json() -> dict:
    targets = [node(LAYER, i, rank=n + 1, attribution_total=1.0, attribution_kept=0.8)
               for n, i in enumerate(RANKED)]
    example = {"activation": 2.0, "max_index": 1, "tokens": ["a", SCRIPT, IMG],
               "activations": [0.0, 2.0, 1.0]}
    ups = [node(UP, j, top_examples=[example]) for j in UPSTREAM]
    edges = [{"source": f"{UP}:{j}", "target": f"{LAYER}:{i}", "weight": w, "share": abs(w)}
             for i, j, w in ((RANKED[0], 7, 0.5), (RANKED[0], 3, -0.3), (RANKED[1], 12, 0.2),
                             (RANKED[2], 3, 0.1))]
    return {"schema_version": 1, "stage": "circuit", "run": "run", "model": "tiny",
            "measure": "loss", "positions": "all", "layers": [UP, LAYER],
            "hops": [{"upstream_layer": UP, "target_layer": LAYER, "upstream_sae": IMG,
                      "targets": RANKED, "route": "stacked", "abar_source": "sae",
                      "edges_kept": 4, "kept_share": [0.8, 0.8, 0.8]}],
            "nodes": targets + ups, "edges": edges, "dataset": None, "counts": {},
            "options": {}, "versions": {}}


@pytest.fixture(scope="module")
def circuit_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report_circuit") / "run"
    make_attribution(run)
    (run / "circuit").mkdir()
    (run / "circuit" / "circuit.json").write_text(json.dumps(circuit_json()), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def page(circuit_run) -> str:
    return write_report(circuit_run).read_text(encoding="utf-8")


def test_the_graph_is_inline_svg_with_escaped_text_and_no_new_script(page):
    for raw in HOSTILE:
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = elements(page)
    tags = [t for t, _ in parsed.tags]
    assert tags.count("script") == 1 and tags.count("svg") == 1
    for tag, attrs in parsed.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        for name in ("href", "src"):
            assert not re.match(r"\s*(https?:|//|file:)", attrs.get(name) or "", re.I)
    section = page[page.index('<section id="circuit">'):]
    section = section[:section.index("</section>")]
    assert section.count('class="cnode"') == len(RANKED) + len(UPSTREAM)
    assert section.count('class="cedge"') == 4 and section.count('class="cpanel"') == 6
    assert 'id="cnode-1-7"' in section and 'id="panel-cnode-1-7"' in section
    assert 'data-source="cnode-1-7" data-target="cnode-3-5"' in section
    assert 'stroke="rgb(214,39,40)"' in section and 'stroke="rgb(31,119,180)"' in section
    assert 'style="background-color:rgba(' in section  # the examples' highlight


def test_edge_widths_follow_the_weights_and_the_drilldown_lists_upstream_latents(page):
    into_best = re.findall(r'stroke-width="([\d.]+)" fill="none" data-source="(cnode-1-\d+)" '
                           r'data-target="cnode-3-5"', page)
    widths = {src: float(w) for w, src in into_best}
    assert widths["cnode-1-7"] == 9.0 and widths["cnode-1-3"] < widths["cnode-1-7"]
    start = page.index(f'id="latent-{RANKED[0]}"')
    drill = page[start:page.index("</details>", start)]
    assert "Upstream latents (circuit)" in drill
    assert drill.index('href="#cnode-1-7"') < drill.index('href="#cnode-1-3"')


def test_upstream_nodes_sit_beside_the_targets_they_feed():
    g = circuit_json()
    place = layout(g["nodes"], g["edges"], [UP, LAYER])
    rows = {k: y for k, (_, y) in place.items()}
    assert [k for k in sorted(rows, key=rows.get) if k.startswith(f"{UP}:")] == \
        ["1:7", "1:3", "1:12"]  # 7 feeds rank 1; 3 feeds ranks 1 and 3; 12 feeds rank 2


def test_without_circuit_json_the_section_is_left_out_and_dir_chooses_the_folder(
        circuit_run, tmp_path):
    bare = tmp_path / "run"
    make_attribution(bare)
    out = tmp_path / "r.html"
    assert 'id="circuit"' not in write_report(bare, out).read_text(encoding="utf-8")
    assert main(["report", str(bare), "--out", str(out), "--circuit",
                 str(circuit_run / "circuit")]) == 0
    assert '<section id="circuit">' in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("change, message", [
    (lambda g: g["edges"].append({"source": "1:7", "target": "9:9", "weight": 1.0}),
     "edge 5 does not join two of the file's nodes"),
    (lambda g: g["edges"][0].update(weight="big"), "edge 1 has no finite 'weight'"),
    (lambda g: g["nodes"][0].pop("layer"), "node 1 needs a string 'id'"),
    (lambda g: g.update(nodes={}), "fields 'nodes' and 'edges' must be lists"),
])
def test_a_bad_circuit_json_is_one_clear_error(tmp_path, change, message):
    run = tmp_path / "run"
    make_attribution(run)
    g = circuit_json()
    change(g)
    (run / "circuit").mkdir()
    (run / "circuit" / "circuit.json").write_text(json.dumps(g))
    with pytest.raises(LatentAuditError, match=re.escape(message)) as err:
        write_report(run)
    assert "circuit.json" in str(err.value) and "latentaudit circuit" in str(err.value)


@pytest.mark.skipif(shutil.which("node") is None, reason="no node binary to parse the script")
def test_the_page_script_parses(tmp_path):
    from latentaudit.report.render import environment

    path = tmp_path / "report.js"
    path.write_text(environment().get_template("report.js").render(), encoding="utf-8")
    done = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_chromium
def test_in_chromium_a_node_named_in_the_address_is_selected(circuit_run, page, tmp_path):
    report = circuit_run / "report.html"
    dom, console = browse(f"{report.as_uri()}#cnode-1-3", tmp_path, "--dump-dom")
    assert console == []
    assert root_tag(dom) == '<html lang="en" data-cnode="cnode-1-3" data-ready="1">'
    assert re.search(r'<svg id="circuit-svg"[^>]*class="focus"', dom)
    on = re.findall(r'<path class="cedge on"[^>]*data-source="(cnode-[\d-]+)" '
                    r'data-target="(cnode-[\d-]+)"', dom)
    assert sorted(on) == sorted([("cnode-1-3", f"cnode-{LAYER}-{RANKED[0]}"),
                                 ("cnode-1-3", f"cnode-{LAYER}-{RANKED[2]}")])
    panels = re.findall(r'<div class="cpanel" id="(panel-cnode-[\d-]+)"( hidden="")?', dom)
    assert [p for p, hidden in panels if not hidden] == ["panel-cnode-1-3"]
