"""`latentaudit explain` end to end through the real entry point on a tiny model: the documented
files and fields, the per-SAE cache, explanations from a loopback fake endpoint (the key written
nowhere), and `--across`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.explain import across_runs
from test_judges import SECRET, FakeServer, chat_reply
from tiny import random_sae

EXAMPLE = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    random_sae(32, 48, layer=1).save(root / "sae")
    data = root / "data.jsonl"
    data.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:12]))
    assert main(["attribute", "--model", str(tiny_model_dir), "--sae", str(root / "sae"),
                 "--data", str(data), "--out", str(root / "run"), "--top-k", "30",
                 "--device", "cpu"]) == 0
    corpus = root / "corpus.txt"
    corpus.write_text("Water boils at one hundred degrees at sea level. " * 40)
    return root


def explain(run_dir, *extra):
    return main(["explain", "--from", str(run_dir / "run"), "--corpus",
                 str(run_dir / "corpus.txt"), "--corpus-tokens", "800", "--context-len", "40",
                 "--top-k", "4", "--examples", "3", "--exact-pairs", "2", "--map-pairs", "3",
                 "--cache-dir", str(run_dir / "cache"), "--device", "cpu", *extra])


def test_explain_cli_writes_the_documented_files(run_dir, capsys):
    assert explain(run_dir) == 0
    printed = capsys.readouterr().out
    assert "4 latents; examples from" in printed and "Spearman" in printed
    out = run_dir / "run" / "explain"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["stage"] == "explain"
    assert set(manifest) >= {"run", "model", "layers", "latents", "source", "positions", "corpus",
                             "density_histogram_edges", "map_columns", "exactness",
                             "interpretation", "options", "versions"}
    assert manifest["corpus"]["tokens"] == 21 * 39  # ⌈800 / 39⌉ sequences of 39 positions
    rows = [json.loads(x) for x in (out / "latents.jsonl").read_text().splitlines()]
    ranking = [json.loads(x) for x in (run_dir / "run" / "ranking.jsonl").read_text().splitlines()]
    assert [r["latent"] for r in rows] == [r["latent"] for r in ranking[:4]]
    for r in rows:
        assert set(r) == {"layer", "latent", "rank", "final_rank", "delta_attribution",
                          "delta_activation", "exact_delta", "first_order_delta", "logit_lens",
                          "density", "top_examples", "attribution_map", "explanation"}
        assert set(r["logit_lens"]) == {"cosine", "promoted", "suppressed", "through_final_norm"}
        assert len(r["logit_lens"]["promoted"]) == 10
        assert set(r["density"]) == {"tokens", "fired", "frequency", "histogram"}
        assert len(r["density"]["histogram"]) == len(manifest["density_histogram_edges"]) - 1
        assert sum(r["density"]["histogram"]) == r["density"]["fired"]
        for ex in r["top_examples"]:
            assert set(ex) == {"activation", "sequence", "position", "max_index", "token_ids",
                               "tokens", "activations"}
        assert set(r["attribution_map"]) == {"mean_positive", "mean_negative", "top_tokens"}
    maps = load_file(out / "token_maps.safetensors")
    comps = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert maps["offsets"][-1] == maps["token_ids"].numel() == maps["token_delta"].shape[0]
    assert len(comps) == maps["offsets"].numel() - 1
    assert maps["token_delta"].shape[1] == len(manifest["map_columns"]) == maps["latents"].numel()
    for c in comps:
        assert set(c) == {"index", "line", "prompt_id", "label", "weight", "offset", "n_tokens",
                          "n_prompt_tokens", "tokens", "loss", "delta"}
        block = maps["token_delta"][c["offset"]:c["offset"] + c["n_tokens"]]
        assert c["delta"] == pytest.approx(block.sum(0).tolist(), rel=1e-5, abs=1e-7)
    exact = json.loads((out / "exact.json").read_text())
    layer = exact["layers"]["1"]
    assert len(layer["pairs"]) == 2 and len(layer["exact_delta"]) == len(layer["latents"])
    assert layer["route"] == "upper-layers"


def test_explain_cli_second_run_reads_the_cache(run_dir, caplog):
    import logging

    assert explain(run_dir, "--no-maps", "--exact-pairs", "0") == 0
    with caplog.at_level(logging.INFO):
        assert explain(run_dir, "--no-maps", "--exact-pairs", "0", "--latents", "5,2") == 0
    assert "read from the cache" in caplog.text
    out = run_dir / "run" / "explain"
    assert not (out / "exact.json").exists() and not (out / "token_maps.safetensors").exists()
    rows = [json.loads(x) for x in (out / "latents.jsonl").read_text().splitlines()]
    assert {r["latent"] for r in rows} == {5, 2}


@pytest.mark.parametrize(("flags", "message"), [
    (["--latents", "a,b"], "--latents 'a,b'"),
    (["--latents", "999"], "out of range"),
    (["--rescore", "5", "--exact-pairs", "0"], "--rescore needs"),
    (["--top-k", "0"], "--top-k must be at least 1"),
])
def test_explain_cli_errors_are_one_line(run_dir, capsys, flags, message):
    assert explain(run_dir, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_explanations_from_a_fake_endpoint_keep_the_key_out_of_files(run_dir, monkeypatch,
                                                                     tmp_path):
    server = FakeServer()
    server.responder = lambda body: {"body": chat_reply("Fires on degrees of temperature.")}
    monkeypatch.setenv("LA_TEST_KEY", SECRET)
    out = tmp_path / "explain"
    try:
        args = ["--interpret-model", "m1", "--interpret-base-url", server.url,
                "--interpret-api-key-env", "LA_TEST_KEY", "--out", str(out), "--no-maps",
                "--exact-pairs", "0"]
        assert explain(run_dir, *args) == 0
        assert len(server.requests) == 4
        assert server.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
        prompt = server.requests[0]["body"]["messages"][0]["content"]
        assert "«" in prompt and "promotes" in prompt
        assert explain(run_dir, *args) == 0
        assert len(server.requests) == 4  # every explanation came from the cache
    finally:
        server.close()
    rows = [json.loads(x) for x in (out / "latents.jsonl").read_text().splitlines()]
    assert {r["explanation"] for r in rows} == {"Fires on degrees of temperature."}
    for file in out.iterdir():
        assert SECRET not in file.read_text(errors="replace"), file
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["interpretation"] == {"model": "m1", "base_url": server.url}


# -- across runs ----------------------------------------------------------------------------------

def fake_run(folder: Path, latents: list[int], model="m", sae="s", d_sae=50,
             adapter_base: str | None = None) -> Path:
    """A run folder whose ranking holds ``latents`` in that order."""
    folder.mkdir(parents=True)
    delta = torch.zeros(d_sae)
    for rank, i in enumerate(latents):
        delta[i] = 1.0 - rank / 100
    save_file({"delta_attribution": delta}, folder / "attribution.safetensors")
    (folder / "ranking.jsonl").write_text("".join(
        json.dumps({"layer": 3, "latent": i, "rank": r}) + "\n"
        for r, i in enumerate(latents, 1)))
    (folder / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "model": {"name": model, **(
            {"adapter": {"base": adapter_base}} if adapter_base else {})}, "layers": [3],
         "saes": {"3": {"path": sae}}}))
    return folder


def test_across_runs_by_hand(tmp_path):
    a = fake_run(tmp_path / "a", [1, 2, 3, 4])
    b = fake_run(tmp_path / "b", [4, 9, 1, 7])
    c = fake_run(tmp_path / "c", [7, 4, 8, 2])
    table = across_runs([a, b, c], top_k=3)
    got = [(r["latent"], r["runs_in_top"], r["ranks"]) for r in table["latents"]]
    # 4: ranks (-, 1, 2) → 2 runs, mean 1.5; 1: (1, 3, -) → mean 2; 7 and 2 are in one top only
    assert got == [(4, 2, [None, 1, 2]), (1, 2, [1, 3, None])]
    assert table["latents"][0]["delta_attribution"] == pytest.approx([0.97, 1.0, 0.99])
    assert [r["latent"] for r in across_runs([a, b, c], top_k=4, min_runs=3)["latents"]] == [4]
    with pytest.raises(LatentAuditError, match="compare runs of one model"):
        across_runs([a, fake_run(tmp_path / "d", [1], model="other")])
    with pytest.raises(LatentAuditError, match="compare runs of one SAE"):
        across_runs([a, fake_run(tmp_path / "e", [1], sae="other")])
    with pytest.raises(LatentAuditError, match="at least two"):
        across_runs([a])


def test_across_cli(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [1, 2, 3])
    b = fake_run(tmp_path / "b", [3, 1, 5])
    out = tmp_path / "across.json"
    assert main(["explain", "--across", str(a), str(b), "--top-k", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 latent(s) in the top 3 of at least 2 of 2 runs" in printed
    table = json.loads(out.read_text())
    assert table["schema_version"] == 1
    assert [(r["latent"], r["ranks"]) for r in table["latents"]] == [(1, [1, 2]), (3, [3, 1])]


def test_across_overlap_against_chance_and_a_fine_tune_against_its_base(tmp_path, capsys):
    from latentaudit.explain.overlap import hypergeometric_tail

    a = fake_run(tmp_path / "a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    b = fake_run(tmp_path / "b", [2, 1, 30, 31, 32, 4, 33, 34, 35, 36, 37],
                 model="m-organism", adapter_base="m")
    table = across_runs([a, b], top_k=3)
    rows = {o["k"]: o for o in table["overlap"]}
    assert set(rows) == {1, 10}  # K = 100 > 50 latents is left out
    assert (rows[1]["overlap"], rows[1]["shared"]) == (0, [])
    assert (rows[10]["overlap"], rows[10]["shared"]) == (3, [1, 2, 4])
    assert rows[10]["expected"] == pytest.approx(100 / 50)
    assert rows[10]["p_value"] == pytest.approx(hypergeometric_tail(50, 10, 3))
    assert table["models"] == ["m", "m-organism"]
    assert main(["explain", "--across", str(a), str(b), "--top-k", "3"]) == 0
    assert "K= 10: 3 shared (chance 2, p = " in capsys.readouterr().out


def test_one_sae_is_recognised_across_checkouts(tmp_path):
    """Runs made in two checkouts record two paths of one SAE: the same bytes, or the same
    shipped SAE where the files are not here, count as one; other SAEs do not."""
    from latentaudit.explain.across import same_sae

    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    c.write_bytes(b"other")
    assert same_sae(str(a), str(b)) and not same_sae(str(a), str(c))
    one = "/x/src/latentaudit/saes/shipped/qwen/sae.safetensors"
    two = "/y/site-packages/latentaudit/saes/shipped/qwen/sae.safetensors"
    assert same_sae(one, two)
    assert not same_sae(one, two.replace("qwen", "smol"))
    assert not same_sae("/x/my-sae/sae.safetensors", "/y/my-sae/sae.safetensors")
    assert not same_sae(None, one)
