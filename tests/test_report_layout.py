"""The report's layout in a real headless Chromium at 1280 and 1920 px: nothing runs past the
page's edge (long paths and stage notes wrap, the ranked table needs no sideways scroll), and
the circuit graph's box is the size of its graph."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")

import test_report as R  # noqa: E402
from latentaudit.report import write_report  # noqa: E402
from test_report_circuit import circuit_json  # noqa: E402

MEASURE = """<script>
window.addEventListener("load", function () {
  var root = document.documentElement, out = [];
  out.push("page:" + root.scrollWidth + "/" + window.innerWidth);
  document.querySelectorAll("main table").forEach(function (t) {
    var box = t.closest(".scroll") || t.parentElement;
    out.push("table " + (t.id || t.className) + ":" + t.scrollWidth + "/" + box.clientWidth);
  });
  var g = document.querySelector(".circuit-graph"), svg = document.getElementById("circuit-svg");
  if (g) out.push("circuit:" + g.clientWidth + "/" + svg.getAttribute("width"));
  root.setAttribute("data-layout", out.join(";"));
});
</script>"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run = tmp_path_factory.mktemp("layout") / "run"
    R.make_attribution(run)
    R.make_explain(run)
    R.make_steering(run)
    rows = [json.loads(x) for x in (run / "steering.jsonl").read_text().splitlines()]
    R.write_jsonl(run / "steering.jsonl", [r for r in rows if r["direction"] == "away"])
    long_path = "/home/someone/" + "a-long-folder-name/" * 8 + "completions.jsonl"
    R.write_json(run / "pipeline.json", {
        "schema_version": 1, "config": long_path, "notes": ["Demo sizes " * 40],
        "stages": {"sample": {"status": "given", "reason": f"completions = {long_path}"},
                   "judge": {"status": "done", "seconds": 222, "summary": {
                       "completions": 112, "judge": f"probe:{long_path}", "positive": 60,
                       "negative": 40, "excluded": 12}}}})
    (run / "circuit").mkdir()
    (run / "circuit" / "circuit.json").write_text(json.dumps(circuit_json()), encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    bare = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
    path = run / "measured.html"
    path.write_text(bare.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    return path


@pytest.mark.skipif(R.chromium() is None, reason="no Chromium binary on PATH "
                    "(apt-get install -y chromium)")
@pytest.mark.parametrize("width", [1280, 1920])
def test_the_page_fits_its_window_and_the_graph_its_box(page, tmp_path, width):
    dom, console = R.browse(page.as_uri(), tmp_path, "--dump-dom",
                            f"--window-size={width},1000", "--hide-scrollbars")
    assert console == []
    found = dict(item.split(":", 1) for item in
                 re.search(r'data-layout="([^"]*)"', dom)[1].split(";"))
    used, window = map(int, found.pop("page").split("/"))
    assert window == width and used <= width
    circuit = found.pop("circuit")
    box, svg = map(float, circuit.split("/"))
    assert box <= svg + 2  # the box hugs the graph (inline-block, no empty frame)
    assert svg < 700  # sized to its nodes and labels, not a fixed frame
    for name, sizes in found.items():
        need, have = map(int, sizes.split("/"))
        if name.startswith("table sortable data"):  # every steering condition: scrolls
            continue
        assert need <= have + 1, f"{name} needs {need} px in a {have} px box at {width} px"
