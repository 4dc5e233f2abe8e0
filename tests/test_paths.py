"""The config and API paths a new user types: ``demo --show-config`` saved anywhere and run,
and ``load_sae`` with every name ``--sae`` takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.pipeline.config import read_config


def test_the_shown_demo_config_runs_from_any_folder(tmp_path, capsys, monkeypatch):
    from latentaudit.pipeline.demo import DEMO_DIR

    saved, elsewhere = tmp_path / "mine", tmp_path / "elsewhere"
    saved.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(saved)
    assert main(["demo", "--show-config"]) == 0
    (saved / "my.toml").write_text(capsys.readouterr().out, encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    cfg = read_config(Path("..") / "mine" / "my.toml")
    assert cfg.out == saved / "runs" / "demo"  # out is set, relative to the copy's folder
    assert cfg.entry == "completions" and cfg.entry_file == DEMO_DIR / "completions.jsonl"
    assert main(["run", str(saved / "my.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sample     given   completions = {DEMO_DIR / 'completions.jsonl'}" in out
    assert not (saved / "runs").exists() and not (elsewhere / "runs").exists()


def test_load_sae_takes_every_name_sae_takes():
    import latentaudit as la
    from latentaudit.saes.shipped import SHIPPED_DIR

    default = la.load_sae("default")
    assert default.info.layer == 12 and default.d_model == 896
    assert Path(default.info.source_path).parent == SHIPPED_DIR / "qwen2.5-0.5b-instruct"
    assert la.load_sae("default", model="qwen2.5-coder-0.5b-instruct").d_sae == default.d_sae
    assert la.load_sae("qwen2.5-0.5b-instruct-l6").info.layer == 6
    small = la.load_sae("default", model="smollm2-135m-instruct")
    assert Path(small.info.source_path).parent == SHIPPED_DIR / "smollm2-135m-instruct"
    path = la.load_sae(SHIPPED_DIR / "qwen2.5-0.5b-instruct-l6")
    assert path.info.layer == 6
    with pytest.raises(LatentAuditError, match="ships no SAE for model 'no-such-model'"):
        la.load_sae("default", model="no-such-model")
