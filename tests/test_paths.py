"""The config and API paths a new user types: ``demo --show-config`` saved anywhere and run,
and ``load_sae`` with every name ``--sae`` takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.pipeline.config import read_config


def _shown_config_elsewhere(tmp_path, capsys, monkeypatch) -> tuple[Path, Path]:
    """Save `demo --show-config` as mine/my.toml, then work from a sibling folder."""
    saved, elsewhere = tmp_path / "mine", tmp_path / "elsewhere"
    saved.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(saved)
    assert main(["demo", "--show-config"]) == 0
    (saved / "my.toml").write_text(capsys.readouterr().out, encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    return saved, elsewhere


def test_the_shown_demo_config_runs_from_any_folder(tmp_path, capsys, monkeypatch):
    from latentaudit.pipeline.demo import DEMO_DIR

    saved, _ = _shown_config_elsewhere(tmp_path, capsys, monkeypatch)
    cfg = read_config(Path("..") / "mine" / "my.toml")
    assert cfg.out == saved / "runs" / "demo"  # out is set, relative to the copy's folder
    assert cfg.entry == "completions" and cfg.entry_file == DEMO_DIR / "completions.jsonl"


@pytest.mark.embedded
def test_the_shown_demo_config_dry_runs_from_another_folder(tmp_path, capsys, monkeypatch):
    from latentaudit.models import embedded
    from latentaudit.pipeline.demo import DEMO_DIR

    if not (embedded.is_installed("qwen2.5-0.5b-instruct")
            or embedded.is_cached("qwen2.5-0.5b-instruct")):
        pytest.skip("qwen2.5-0.5b-instruct is not installed (the dry run checks it is)")
    saved, elsewhere = _shown_config_elsewhere(tmp_path, capsys, monkeypatch)
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


def test_the_closing_table_says_what_a_stage_did_not_that_it_had_not_run():
    from types import SimpleNamespace as NS

    from latentaudit.cli.run import summary_lines
    from latentaudit.pipeline.records import StageRecord

    plans = [NS(name="pair", action="run", why="not run yet"),
             NS(name="steer", action="run", why="not run yet"),
             NS(name="judge", action="skip", why="done, unchanged")]
    stages = {"pair": StageRecord("done", seconds=2.0, summary={
                  "pairs": 130, "prompts_with_pairs": 14, "prompts": 14}),
              "steer": StageRecord("done", seconds=5.0),
              "judge": StageRecord("done", seconds=1.0)}
    result = NS(plans=plans, record=NS(stages=stages), notes=[], run="r", report=None)
    lines = summary_lines(result)
    assert not any("done" in line and "not run yet" in line for line in lines)
    assert lines[1].endswith("run     130 pairs from 14 of 14 prompts")
    assert lines[2].endswith("run     ran in this run")
    assert lines[3].endswith("skip    done, unchanged")


def test_a_bar_whose_input_runs_out_early_ends_at_100_percent():
    from latentaudit._progress import end_at_count, progress

    with progress(total=63, desc="top examples L12", unit="seq", disable=False) as bar:
        bar.update(42)
        end_at_count(bar)
        assert (bar.n, bar.total) == (42, 42)
        bar.total = 80
        bar.update(38)
        end_at_count(bar)  # a finished bar is left as it is
        assert (bar.n, bar.total) == (80, 80)


@pytest.mark.parametrize("command", ["steer", "explain", "attribute", "run", "report"])
def test_help_names_each_default_once_and_never_none(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: the run's). (default:" not in text
    if command == "steer":
        assert "--model MODEL Model (default: the run's). --sae" in text
        assert "Concurrent requests. (default: 8)" in text


def test_the_demo_leaves_no_attribution_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace as NS

    import latentaudit.pipeline.demo as demo
    from latentaudit.pipeline.records import StageRecord
    from latentaudit.runfolder import CHECKPOINT

    def fake_run(config, out, dry_run):
        (Path(out) / CHECKPOINT).write_bytes(b"x")
        status = "partial" if Path(out).name == "partial" else "done"
        return NS(run=Path(out), record=NS(stages={"attribute": StageRecord(status)}))

    monkeypatch.setattr(demo, "run_pipeline", fake_run)
    for name in ("done", "partial"):
        (tmp_path / name).mkdir()
        demo.run_demo(tmp_path / name)
    assert not (tmp_path / "done" / CHECKPOINT).exists()
    assert (tmp_path / "partial" / CHECKPOINT).exists()  # an interrupted demo resumes from it


def test_the_report_names_the_embedded_model_it_is():
    from latentaudit.report.sections.attribution import model_title

    assert model_title("qwen2.5-0.5b-instruct") == \
        "qwen2.5-0.5b-instruct (Qwen2.5-Coder-0.5B-Instruct)"
    assert model_title("qwen2.5-coder-0.5b-instruct").endswith("(Qwen2.5-Coder-0.5B-Instruct)")
    assert model_title("/models/mine") == "/models/mine"
