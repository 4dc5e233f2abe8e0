"""Neuronpedia pages of a public SAE's latents: in the ranking, the report, explain's output and
``explain --neuronpedia-list``, with no network call (the SAE comes from an offline hub cache)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from latentaudit.cli import main
from latentaudit.saes import releases
from latentaudit.saes.releases import neuronpedia_list, neuronpedia_url, split_url
from test_sae_hub import GS_PATH, GS_RES, gemma_params, npz_bytes, put

EXAMPLE = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"
NP_ID = "gemma-2-2b/1-gemmascope-res-16k"
PAGE = "https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/"


def test_page_and_list_formats():
    assert neuronpedia_url("gemma-2-2b/20-gemmascope-res-16k", 10956) == \
        "https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/10956"
    assert split_url(neuronpedia_url(NP_ID, 7)) == (NP_ID, 7)
    listed = neuronpedia_list("my list", [(NP_ID, 7, "dogs"), ("gpt2-small/3-res-jb", 12, "")])
    assert listed["features"] == [
        {"modelId": "gemma-2-2b", "layer": "1-gemmascope-res-16k", "index": "7",
         "description": "dogs"},
        {"modelId": "gpt2-small", "layer": "3-res-jb", "index": "12", "description": ""}]
    url = urlparse(listed["url"])
    assert (url.scheme, url.netloc, url.path) == ("https", "www.neuronpedia.org", "/quick-list/")
    query = parse_qs(url.query)
    assert query["name"] == ["my list"]
    assert json.loads(query["features"][0]) == [
        {"modelId": "gemma-2-2b", "layer": "1-gemmascope-res-16k", "index": "7"},
        {"modelId": "gpt2-small", "layer": "3-res-jb", "index": "12"}]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """attribute + explain (with --neuronpedia-list) on a Gemma Scope SAE named by its SAELens
    id, read from an offline hub cache with the network blocked."""
    root = tmp_path_factory.mktemp("neuronpedia")
    data = root / "data.jsonl"
    data.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:12]))
    (root / "corpus.txt").write_text("Water boils at one hundred degrees at sea level. " * 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(releases, "_saelens_registry", lambda: None)

        def no_network(*args, **kwargs):
            raise AssertionError("opened a network connection")
        mp.setattr(socket.socket, "connect", no_network)
        put(root / "hf" / "hub", GS_RES, {f"{GS_PATH}/params.npz": npz_bytes(root, {
            **gemma_params(0), "threshold": gemma_params(0)["threshold"] * 0})})
        assert main(["attribute", "--model", str(tiny_model_dir), "--sae",
                     f"saelens:gemma-scope-2b-pt-res-canonical/{GS_PATH}", "--data", str(data),
                     "--out", str(root / "run"), "--top-k", "10", "--device", "cpu"]) == 0
        assert main(["explain", "--from", str(root / "run"), "--corpus",
                     str(root / "corpus.txt"), "--corpus-tokens", "400", "--context-len", "40",
                     "--top-k", "3", "--examples", "2", "--exact-pairs", "2", "--map-pairs", "2",
                     "--cache-dir", str(root / "cache"), "--device", "cpu",
                     "--neuronpedia-list", str(root / "list.json")]) == 0
    return root


def test_ranking_and_manifest_carry_the_pages(run):
    rows = [json.loads(x) for x in (run / "run" / "ranking.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert [r["neuronpedia_url"] for r in rows] == [PAGE + str(r["latent"]) for r in rows]
    manifest = json.loads((run / "run" / "manifest.json").read_text())
    assert manifest["saes"]["1"]["neuronpedia_id"] == NP_ID
    assert manifest["saes"]["1"]["hub"]["repo"] == GS_RES


def test_explain_rows_and_the_list_carry_the_pages(run):
    rows = [json.loads(x) for x in
            (run / "run" / "explain" / "latents.jsonl").read_text().splitlines()]
    assert [r["neuronpedia_url"] for r in rows] == [PAGE + str(r["latent"]) for r in rows]
    listed = json.loads((run / "list.json").read_text())
    assert [(f["modelId"], f["layer"], f["index"]) for f in listed["features"]] == [
        ("gemma-2-2b", "1-gemmascope-res-16k", str(r["latent"])) for r in rows]
    assert all(f["description"].startswith("promoted: ") for f in listed["features"])
    assert listed["url"].startswith("https://www.neuronpedia.org/quick-list/?name=")


def test_the_report_links_each_ranked_latent(run):
    from latentaudit.report import write_report

    page = write_report(run / "run").read_text(encoding="utf-8")
    rows = [json.loads(x) for x in (run / "run" / "ranking.jsonl").read_text().splitlines()]
    for r in rows:
        assert f'href="{PAGE}{r["latent"]}" target="_blank" rel="noopener"' in page
    assert f"{GS_RES} at revision" in page


def test_a_list_needs_a_public_sae_and_says_so_before_the_model_loads(run, tmp_path, capsys):
    manifest = json.loads((run / "run" / "manifest.json").read_text())
    for entry in manifest["saes"].values():
        entry.pop("neuronpedia_id")
        entry["path"] = str(tmp_path / "elsewhere")
    other = tmp_path / "run"
    other.mkdir()
    for name in ("ranking.jsonl", "attribution.safetensors"):
        (other / name).write_bytes((run / "run" / name).read_bytes())
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["explain", "--from", str(other), "--model", str(tmp_path / "no-model"),
                 "--neuronpedia-list", str(tmp_path / "l.json")]) == 2
    assert "not from a public release latentaudit knows" in capsys.readouterr().err
