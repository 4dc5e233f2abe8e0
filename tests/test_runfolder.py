"""The run-folder contract: a folder written before the contract existed still reads, the readers
of every stage agree, and the condition key round-trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from latentaudit import runfolder as rf
from latentaudit.errors import LatentAuditError
from latentaudit.runfolder import ConditionKey, RunFolder, SteeringRow

OLD = Path(__file__).parent / "data" / "schema1"
"""A run written by `latentaudit attribute` before runfolder.py (schema 1), with its dataset."""


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    shutil.copytree(OLD, tmp_path / "schema1")
    monkeypatch.chdir(tmp_path)  # the recorded dataset path is relative: found from the parent
    return tmp_path / "schema1" / "run"


def test_schema1_run_reads(old_run):
    run = RunFolder.open(old_run)
    raw = load_file(old_run / rf.TENSORS)
    assert run.layers == [1] and run.model_name == "model"
    assert run.sae_path(1) == "sae/sae.safetensors"
    np.testing.assert_array_equal(run.delta_attribution(1, "np"), raw["delta_attribution"])
    np.testing.assert_array_equal(run.delta_activation(1, "np"), raw["delta_activation"])
    assert run.d_sae(1) == 24
    ranked = run.ranked(1)
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]
    top = np.argsort(-raw["delta_attribution"], kind="stable")[:5].tolist()
    assert [r["latent"] for r in ranked] == top
    # the dataset resolves from the run's parent folder, and its prompts are what is held out
    assert run.dataset_file() == old_run.parent / "dataset.jsonl"
    lines = (old_run.parent / "dataset.jsonl").read_text().splitlines()
    assert run.prompt_ids() == {json.loads(x)["prompt_id"] for x in lines}
    rows, pairing, ds = run.pairs()
    assert len(rows) == 8 and ds["sha256"] == run.dataset_sha256


def test_every_stage_reader_agrees(old_run):
    import torch

    from latentaudit.explain.run import read_run as explain_run
    from latentaudit.monitor.inputs import read_run as monitor_run
    from latentaudit.steer.latents import latent_sets
    from latentaudit.steer.latents import read_run as steer_run

    steer, explain, monitor = steer_run(old_run), explain_run(old_run), monitor_run(old_run)
    assert torch.equal(steer.delta_attribution(1), explain.delta_attribution(1))
    assert torch.equal(monitor.delta_attribution, explain.delta_attribution(1))
    assert monitor.prompts() == steer.prompt_ids()
    ranked = [r["latent"] for r in explain.ranked(1)]
    assert monitor.top(5) == ranked
    sets = latent_sets(steer, ("attribution", "random"), 5, 0, 24)
    assert sets["attribution"] == ranked
    assert len(sets["random"]) == 5 and not set(sets["random"]) & set(ranked)


def test_dataset_gone_and_newer_schema(old_run):
    (old_run.parent / "dataset.jsonl").unlink()
    run = RunFolder.open(old_run)
    assert run.dataset_file() is None and run.prompt_ids() is None
    with pytest.raises(LatentAuditError, match="does not exist: pass --data"):
        run.pairs()
    manifest = json.loads((old_run / rf.MANIFEST).read_text())
    manifest["schema_version"] = 99
    (old_run / rf.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LatentAuditError, match="'schema_version' is 99"):
        RunFolder.open(old_run)
    del manifest["schema_version"]  # written before the field existed: version 1
    (old_run / rf.MANIFEST).write_text(json.dumps(manifest))
    assert RunFolder.open(old_run).layers == [1]


def test_condition_key_round_trips():
    for key in (ConditionKey((3,), "away", 0.5), ConditionKey((3, 17), "toward", 2.0, "toward"),
                ConditionKey(), ConditionKey(model="toward")):
        assert ConditionKey.parse(str(key)) == key
    assert str(ConditionKey((3, 17), "toward", 2.0, "toward")) == "3+17/toward/2@toward"
    assert str(ConditionKey((3,), "away", 2.0).base) == "base"
    with pytest.raises(LatentAuditError, match="not a steering condition key"):
        ConditionKey.parse("3/away")


def test_condition_key_is_what_steering_writes():
    from latentaudit.steer.config import Condition

    c = Condition("attribution", (4, 9), "away", 0.5, alpha=-1.0, model="toward")
    assert c.key == "4+9/away/0.5@toward" and c.base_id == "base@toward"
    assert ConditionKey.parse(c.key) == c.condition_key
    assert Condition("base").key == "base"


def test_steering_row_round_trips():
    row = SteeringRow("random", [5], "away", 0.5, -2.0, "main", False, 8, 8, 0.5, [0.2, 0.8],
                      0.25, [0.0, 0.5], 0.25, [0.0, 0.5], 8, 0.0, [0.0, 0.0])
    back = SteeringRow.from_dict(json.loads(json.dumps({**row.to_dict(), "later_field": 1})))
    assert back == row and back.key == ConditionKey((5,), "away", 0.5)
