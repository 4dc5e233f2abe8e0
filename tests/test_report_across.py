"""The report's case-study additions: the across-behaviours section (`report --with OTHER`) and
the model-diff columns of the ranked table, against numbers computed here by hand; escaped, and
loading in a real Chromium like the other sections."""

from __future__ import annotations

import re
from math import comb

import numpy as np
import pytest

import test_report as R
from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.report import write_report

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")


def other_run(path, ranked: list[int], *, model=None, sae="sae", steered: dict | None = None):
    """A second run folder on the tiny SAE whose ranking is ``ranked`` (best first), and a
    sweep that steered ``steered`` = {latent: (away, toward)}."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    delta = np.zeros(R.D_SAE, np.float32)
    for n, i in enumerate(ranked):
        delta[i] = 1.0 - 0.1 * n
    save_file({"delta_attribution": delta}, str(path / "attribution.safetensors"))
    R.write_json(path / "manifest.json", {
        "schema_version": 1, "stage": "attribute",
        "model": {"name": model or f"tiny {R.SCRIPT}"}, "layers": [R.LAYER],
        "saes": {str(R.LAYER): {"path": sae}}})
    R.write_jsonl(path / "ranking.jsonl", [
        {"layer": R.LAYER, "latent": i, "rank": n + 1, "delta_attribution": float(delta[i]),
         "logit_lens_top_tokens": [R.IMG]} for n, i in enumerate(ranked)])
    rows = [{"method": "given", "latents": [i], "direction": d, "strength": s, "model": "main",
             "diff": v} for i, (away, toward) in (steered or {}).items()
            for d, v in (("away", away), ("toward", toward)) for s in (0.1, 0.5)
            if v is not None]
    rows += [{"method": "given", "latents": [i], "direction": "away", "strength": 0.5,
              "model": "toward", "diff": 0.9} for i in steered or {}]  # another model: ignored
    if rows:
        R.write_jsonl(path / "steering.jsonl", rows)
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("across")
    run = root / "case" / "run"
    R.make_attribution(run)
    R.make_steering(run)
    # the run ranks 5, 2, 11 (then the small random rest); the other ranks 2, 7, 5, 13
    other = other_run(root / "belief" / "run", [2, 7, 5, 13], steered={2: (-0.2, 0.3)})
    return run, other


def tail(n: int, k: int, x: int) -> float:
    """P(overlap ≥ x) by enumeration of every pair of K-subsets' overlaps."""
    total = comb(n, k)
    return sum(comb(k, j) * comb(n - k, k - j) for j in range(x, k + 1)) / total


def test_the_across_section_against_a_hand_count(two_runs, tmp_path):
    run, other = two_runs
    html = write_report(run, tmp_path / "r.html", with_runs=[other]).read_text("utf-8")
    section = html[html.index('id="across"'):]
    section = section[:section.index("</section>")]
    overlap = section[section.index('id="across-overlap"'):section.index("</table>")]
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in
             re.findall(r"<tr><td>.*?</tr>", overlap, flags=re.S)]
    # K = 1: {5} vs {2}: 0 shared; K = 10: the run's top 10 by Δ-attribution holds 5, 2, 11 and
    # seven random ones; the other's top 10 holds 2, 7, 5, 13 and the six lowest ids with Δ 0
    from safetensors.numpy import load_file

    d_run = load_file(str(run / "attribution.safetensors"))["delta_attribution"]
    d_other = load_file(str(other / "attribution.safetensors"))["delta_attribution"]
    top = {k: (set(np.argsort(-d_run, kind="stable")[:k].tolist()),
               set(np.argsort(-d_other, kind="stable")[:k].tolist())) for k in (1, 10)}
    assert [c[2] for c in cells] == ["1", "10"]  # K = 100 > 16 latents is left out
    for c in cells:
        k = int(c[2])
        shared = len(top[k][0] & top[k][1])
        assert int(c[3]) == shared
        assert float(c[4]) == pytest.approx(k * k / R.D_SAE, rel=1e-2)
        assert float(c[5]) == pytest.approx(tail(R.D_SAE, k, shared), rel=1e-2)
    # the shared-latents table: 2 and 5 are in both top-100 lists (ranks 2/1 and 1/3) ...
    shared = section[section.index('id="across-latents"'):]
    rows = re.findall(r'<tr><td>3</td><td><a href="#latent-(\d+)">', shared)
    assert set(map(int, rows)) >= {2, 5}
    row2 = re.search(r'<a href="#latent-2">2</a></td>(.*?)</tr>', shared, flags=re.S)[1]
    # ... latent 2's steering in the other run: its largest strength, its own model only
    assert "-20.0 pp / +30.0 pp" in row2
    assert R.IMG not in section and "&lt;img" in section  # the lens token is escaped
    # the ranked table names the rank in the other run
    assert "#1 in belief/run" in html


def test_runs_of_another_model_or_sae_are_refused_by_the_flag(two_runs, tmp_path):
    run, _ = two_runs
    wrong = other_run(tmp_path / "w", [1], model="another")
    with pytest.raises(LatentAuditError, match="^--with: .*compare runs of one model"):
        write_report(run, tmp_path / "r.html", with_runs=[wrong])
    sae = other_run(tmp_path / "s", [1], sae="another")
    with pytest.raises(LatentAuditError, match="^--with: .*compare runs of one SAE"):
        write_report(run, tmp_path / "r.html", with_runs=[sae])
    assert main(["report", str(run), "--out", str(tmp_path / "x.html"), "--with",
                 str(tmp_path / "missing")]) != 0


def test_model_diff_columns_read_the_sweeps_file(two_runs, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    run, _ = two_runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    diff = np.linspace(1.0, -1.0, R.D_SAE).astype(np.float32)
    diff[R.RANKED[2]] = 5.0  # the largest: rank 1
    save_file({"model_diff": diff}, str(copy / "steer" / "model_diff.safetensors"))
    R.png(copy / "steering_away_sorted.png")  # the per-method sorted figure beside the columns
    html = write_report(copy).read_text("utf-8")
    figs = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="steering ([^:"]+):', html)
    assert figs == ["away", "away, sorted"]
    head = html[html.index('id="ranking"'):]
    head = head[:head.index("</thead>")]
    assert 'data-key="model_diff"' in head and 'data-key="model_diff_rank"' in head
    row = re.search(rf'<tr data-i="\d+" data-latent="{R.RANKED[2]}".*?</tr>', html, flags=re.S)[0]
    assert 'data-v="5.0"' in row and 'data-v="1.0"' in row
    row = re.search(rf'<tr data-i="\d+" data-latent="{R.RANKED[0]}".*?</tr>', html, flags=re.S)[0]
    rank = int(np.argsort(-diff, kind="stable").tolist().index(R.RANKED[0])) + 1
    assert f'data-v="{float(diff[R.RANKED[0]])!r}"' in row and f'data-v="{float(rank)!r}"' in row
    assert 'data-key="model_diff"' not in write_report(run, tmp_path / "r.html").read_text()


@R.needs_chromium
def test_in_chromium_the_across_section_loads(two_runs, tmp_path):
    run, other = two_runs
    page = write_report(run, tmp_path / "r.html", with_runs=[other])
    dom, console = R.browse(page.as_uri(), tmp_path, "--dump-dom")
    assert console == []
    assert R.root_tag(dom) == '<html lang="en" data-ready="1">'
    assert 'id="across-latents"' in dom
    assert '<img src="x"' not in dom  # the hostile lens token stayed text
