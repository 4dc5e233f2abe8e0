"""`latentaudit attribute` end to end through the real entry point on a tiny model."""

from __future__ import annotations

import json
import os
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


def test_cli_checks_inputs_before_loading_the_model(tmp_path, sae_dir, capsys, monkeypatch):
    import latentaudit.models.load as model_load

    calls = []
    monkeypatch.setattr(model_load, "load_model", lambda *a, **k: calls.append(a))
    bad = tmp_path / "bad.jsonl"
    cut = '{"prompt": "a", "completion": "b", "label": "negative"'  # no closing brace
    bad.write_text('{"prompt": "a", "completion": "b", "label": "positive"}\n' + cut + "\n")
    missing = str(tmp_path / "no-such-model")
    base = ["attribute", "--model", missing, "--out", str(tmp_path / "o")]
    assert main([*base, "--sae", str(sae_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON (Expecting ',' delimiter at column {len(cut) + 1})" in err
    assert main([*base, "--sae", str(sae_dir), "--data", str(EXAMPLE), "--device", "zero"]) == 2
    assert "--device 'zero' is not a device: use auto, cpu, cuda" in capsys.readouterr().err
    assert main([*base, "--sae", str(tmp_path / "nope"), "--data", str(EXAMPLE)]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert main([*base, "--sae", "default", "--data", str(EXAMPLE)]) == 2
    assert "ships no SAE for model" in capsys.readouterr().err
    assert calls == []


def test_cli_multi_layer_sae_is_one_clear_error(tmp_path, capsys):
    folder = tmp_path / "sae"
    random_sae(32, 16).save(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "layer": [3, 5]}))
    rc = main(["attribute", "--model", str(tmp_path / "no-model"), "--sae", str(folder),
               "--data", str(EXAMPLE), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"latentaudit attribute: error: {folder / 'cfg.json'}: field 'layer' lists "
                   "several layers (3, 5): pass --layer with the one to read.")


def test_checkpoint_flags_are_documented_and_reach_the_config(capsys):
    from latentaudit.attribution import AttributionConfig
    from latentaudit.cli import build_parser
    from latentaudit.cli.attribute import config_from_args

    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint-every-batches" in help_text and "--checkpoint-every-seconds" in help_text
    assert ("--checkpoint-every-batches N Save a resumable checkpoint every N batches (0: never "
            "by count). (default: 20)") in help_text
    assert ("--checkpoint-every-seconds S Save a resumable checkpoint when S seconds have passed "
            "since the last one (0: never by time). (default: 300.0)") in help_text
    need = ["attribute", "--model", "m", "--sae", "s", "--data", "d", "--out", "o"]
    assert config_from_args(build_parser().parse_args(need)) == AttributionConfig()
    cfg = config_from_args(build_parser().parse_args(
        [*need, "--checkpoint-every-batches", "3", "--checkpoint-every-seconds", "0"]))
    assert (cfg.checkpoint_every_batches, cfg.checkpoint_every_seconds) == (3, 0)


def test_an_error_starts_on_its_own_line_below_a_progress_bar(tmp_path, capsys, monkeypatch):
    import latentaudit.attribution as attribution
    from latentaudit._progress import progress
    from latentaudit.errors import LatentAuditError

    def failing(*args, **kwargs):
        bar = progress(total=4, desc="attribute", unit="batch")
        bar.update(1)
        raise LatentAuditError("boom")

    monkeypatch.delenv("LATENTAUDIT_QUIET", raising=False)
    monkeypatch.setattr(attribution, "attribute", failing)
    rc = main(["attribute", "--model", "m", "--sae", "s", "--data", "d",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "attribute:  25%" in err  # the bar was shown
    lines = err.split("\n")
    assert "latentaudit attribute: error: boom" in lines
    assert lines[lines.index("latentaudit attribute: error: boom") - 1].rstrip().endswith("]")


def test_python_dash_m_latentaudit_runs_the_cli_without_torch():
    import latentaudit

    src = str(Path(latentaudit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    res = subprocess.run([sys.executable, "-m", "latentaudit", "--help"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0 and "attribute" in res.stdout and "train-sae" in res.stdout
    probe = ("import runpy, sys; sys.argv = ['latentaudit', '--help']\n"
             "try:\n    runpy.run_module('latentaudit', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('torch' in sys.modules, code)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         timeout=60, check=True)
    assert res.stdout.split()[-2:] == ["False", "0"]
