"""`latentaudit run` with a [circuit] section: the circuit stage traces the run's top latents to
an upstream SAE's after explain, is skipped on a rerun, reruns alone when its options change,
and a bad upstream SAE is refused before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from latentaudit.errors import LatentAuditError
from latentaudit.pipeline import read_config, run_pipeline
from latentaudit.pipeline.records import read_record
from test_run import calls, edit, make_root  # noqa: F401  (calls: a fixture)
from tiny import random_sae

CIRCUIT = """
[circuit]
upstream_sae = ["{upstream}"]
top_k = 2
max_edges = 3
batch_size = 4
target_batch = 2
lens_tokens = 3
node_examples = 2
examples = true
"""


@pytest.fixture(scope="module")
def saes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saes")
    return {"run": random_sae(32, 24, layer=1).save(root / "run"),
            "upstream": random_sae(32, 20, seed=1, layer=0).save(root / "upstream"),
            "same_layer": random_sae(32, 20, seed=2, layer=1).save(root / "same_layer"),
            "wide": random_sae(48, 20, seed=3, layer=0).save(root / "wide")}


def circuit_project(root: Path, model: Path, saes: dict[str, Path], upstream: str) -> Path:
    config = make_root(root, model, saes["run"])
    edit(config, "[steer]\n", "[steer]\nskip = true\n")
    config.write_text(config.read_text() + CIRCUIT.format(upstream=upstream))
    return config


@pytest.fixture(scope="module")
def finished(tiny_model_dir, saes, tmp_path_factory) -> Path:
    config = circuit_project(tmp_path_factory.mktemp("project"), tiny_model_dir, saes,
                             str(saes["upstream"]))
    run_pipeline(config)
    return config.parent


@pytest.fixture()
def project(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "p")
    return tmp_path / "p" / "run.toml"


def test_the_circuit_stage_runs_after_explain_and_writes_circuit_json(finished):
    run = finished / "run"
    record = read_record(run)
    rec = record.stages["circuit"]
    assert rec.started >= record.stages["explain"].finished
    assert rec.status == "done"
    assert rec.reads == {"attribute": record.stages["attribute"].fingerprint,
                         "explain": record.stages["explain"].fingerprint}
    graph = json.loads((run / "circuit" / "circuit.json").read_text())
    assert graph["stage"] == "circuit" and graph["layers"] == [0, 1]
    hop, = graph["hops"]
    assert (hop["upstream_layer"], hop["target_layer"]) == (0, 1)
    assert len(hop["targets"]) == 2
    assert (run / "circuit" / "circuit.safetensors").is_file()
    assert rec.summary["hops"][0]["targets"] == hop["targets"]
    assert rec.config["upstream_layer"] is None and "target_batch" not in rec.config
    html = (run / "report.html").read_text()
    assert "2 targets at layer 1" in html


def test_a_rerun_skips_the_finished_circuit_stage(project, calls):  # noqa: F811
    result = run_pipeline(project)
    assert calls == []
    assert {p.name: p.action for p in result.plans}["circuit"] == "skip"


def test_a_changed_circuit_option_reruns_only_the_circuit_and_the_report(project,
                                                                         calls):  # noqa: F811
    edit(project, "max_edges = 3", "max_edges = 2")
    run_pipeline(project)
    assert calls == ["circuit", "load_model", "report"]
    graph = json.loads((project.parent / "run" / "circuit" / "circuit.json").read_text())
    assert graph["options"]["max_edges"] == 2


def test_a_config_without_circuit_has_no_circuit_stage(tiny_model_dir, saes, tmp_path):
    config = make_root(tmp_path, tiny_model_dir, saes["run"])
    plans = run_pipeline(config, dry_run=True).plans
    assert "circuit" not in [p.name for p in plans]
    edit(config, "[steer]\n", "[circuit]\nskip = true\n\n[steer]\n")
    plans = {p.name: p.action for p in run_pipeline(config, dry_run=True).plans}
    assert plans["circuit"] == "off"


@pytest.mark.parametrize("which, message", [
    ("missing", "no such SAE file or folder"),
    ("same_layer", "is not below the targets' layer 1"),
    ("wide", "d_model=48"),
])
def test_a_bad_upstream_sae_is_refused_before_the_model_loads(tiny_model_dir, saes, tmp_path,
                                                              calls, which,  # noqa: F811
                                                              message):
    upstream = str(tmp_path / "nowhere") if which == "missing" else str(saes[which])
    config = circuit_project(tmp_path, tiny_model_dir, saes, upstream)
    with pytest.raises(LatentAuditError, match="upstream_sae") as err:
        run_pipeline(config)
    assert message in str(err.value)
    assert calls == [] and not (tmp_path / "run").exists()


def test_a_circuit_section_without_upstream_sae_is_refused(tiny_model_dir, saes, tmp_path):
    config = make_root(tmp_path, tiny_model_dir, saes["run"])
    config.write_text(config.read_text() + "\n[circuit]\ntop_k = 2\n")
    with pytest.raises(LatentAuditError, match="upstream_sae is missing"):
        read_config(config)


def test_the_shipped_demo_config_traces_a_circuit_from_layer_6():
    from latentaudit.pipeline import DEMO_CONFIG

    cfg = read_config(DEMO_CONFIG, out="x")
    assert cfg.circuit is not None and (cfg.circuit.top_k, cfg.circuit.max_prompts) == (3, 4)
    assert cfg.circuit_options.upstream_sae == ("qwen2.5-0.5b-instruct-l6",)
    assert any(n.startswith("Circuit:") for n in cfg.settings.notes)
