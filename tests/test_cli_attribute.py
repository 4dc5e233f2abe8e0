"""`latentaudit attribute` end to end through the real entry point on a tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentaudit.cli import main
from tiny import random_sae

EXAMPLE = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae")
    random_sae(32, 64, layer=1).save(folder)
    return folder


def test_attribute_cli_writes_documented_files(tiny_model_dir, sae_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["attribute", "--model", str(tiny_model_dir), "--sae", str(sae_dir),
               "--data", str(EXAMPLE), "--out", str(out), "--batch-size", "4", "--top-k", "20",
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "32 completions, 32 pairs from 8 prompts" in printed
    assert "top 10 latents by Δ-attribution" in printed

    tensors = load_file(out / "attribution.safetensors")
    assert tensors["delta_attribution"].shape == (64,)
    assert tensors["delta_activation"].shape == (64,)
    assert tensors["delta_attribution"].dtype == torch.float32
    assert tensors["moment_matrix"].shape == (32, 32)

    rows = [json.loads(line) for line in (out / "ranking.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert [r["rank"] for r in rows] == list(range(1, 21))
    values = [r["delta_attribution"] for r in rows]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(float(tensors["delta_attribution"].max()))
    for r in rows:
        assert set(r) >= {"latent", "rank", "delta_attribution", "delta_activation",
                          "logit_lens_top_tokens"}
        assert len(r["logit_lens_top_tokens"]) == 10
        expected = float(tensors["delta_activation"][r["latent"]])
        assert r["delta_activation"] == pytest.approx(expected)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["layers"] == [1]
    assert manifest["abar_source"] == {"1": "sae"}
    assert manifest["counts"]["completions"] == 32 and manifest["counts"]["pairs"] == 32
    assert len(manifest["dataset"]["sha256"]) == 64
    assert "torch" in manifest["versions"]
    assert not (out / "attribute.checkpoint.safetensors").exists()


def test_attribute_cli_two_layers_get_suffixes(tiny_model_dir, tmp_path):
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    random_sae(32, 16, seed=1).save(s0)
    random_sae(32, 24, seed=2).save(s1)
    out = tmp_path / "run"
    rc = main(["attribute", "--model", str(tiny_model_dir), "--sae", str(s0), "--layer", "0",
               "--sae", str(s1), "--layer", "1", "--data", str(EXAMPLE), "--out", str(out),
               "--abar", "dataset", "--device", "cpu"])
    assert rc == 0
    tensors = load_file(out / "attribution.safetensors")
    assert tensors["delta_attribution_layer0"].shape == (16,)
    assert tensors["delta_attribution_layer1"].shape == (24,)
    layers = {json.loads(line)["layer"] for line in (out / "ranking.jsonl").open()}
    assert layers == {0, 1}


def test_attribute_cli_bad_input_is_one_clear_line(tiny_model_dir, sae_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": "maybe"}\n')
    rc = main(["attribute", "--model", str(tiny_model_dir), "--sae", str(sae_dir),
               "--data", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:1: field 'label'" in err and "Traceback" not in err
    rc = main(["attribute", "--model", str(tiny_model_dir), "--sae", str(sae_dir),
               "--layer", "7", "--data", str(EXAMPLE), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "layer 1" in capsys.readouterr().err


def test_help_is_fast_and_imports_no_torch():
    exe = shutil.which("latentaudit")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "latentaudit.cli", "--help"]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "attribute" in out
    assert time.monotonic() - start < 5
    probe = ("import sys, latentaudit.cli as c; c.build_parser(); "
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]
