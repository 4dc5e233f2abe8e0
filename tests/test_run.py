"""`latentaudit run`: the whole pipeline on a tiny model from prompts, skipping finished stages,
resuming after a kill between stages and inside one, rerunning only what a config change touches,
refusing a bad config before any model loads; and the shipped demo config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError
from latentaudit.pipeline import plan_stages, read_config, run_pipeline, steps
from latentaudit.pipeline.checks import check_inputs
from latentaudit.pipeline.records import read_record
from tiny import random_sae

LAYER = 1
EXAMPLE = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"


def prompt_rows(ids) -> str:
    return "".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"Is claim {i} true, right?",
                               "fact": f"Claim {i} is false.", "meta": {"claim": f"claim {i}"}})
                   + "\n" for i in ids)


CONFIG = """\
model = "{model}"
sae = "{sae}"
prompts = "prompts.jsonl"
rubric = "false-belief"
device = "cpu"
out = "run"
notes = ["tiny sizes, for tests"]

[sample]
n = 4
max_new_tokens = 6
batch_size = 8

[judge]
judge = "rules:rules.json"

[attribute]
top_k = 8
batch_size = 4
checkpoint_every_batches = 1

[explain]
top_k = 2
corpus = "corpus.txt"
corpus_tokens = 120
context_len = 20
examples = 2
map_pairs = 1
exact_pairs = 1
cache_dir = "cache"

[steer]
prompts = "steer_prompts.jsonl"
judge = "rules:rules.json"
coherence_judge = "rules:rules.json"
top_k = 1
methods = ["attribution", "random"]
directions = ["away"]
strengths = [2.0]
n = 2
max_new_tokens = 4
batch_size = 3
n_boot = 100
logodds_top = 2
"""


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    """The SAE, outside the project folders (copies of a project keep its path)."""
    return random_sae(32, 24, layer=LAYER).save(tmp_path_factory.mktemp("sae") / "sae")


def make_root(root: Path, model: Path, sae: Path) -> Path:
    """A project folder: config, prompts, rules judge and reference text."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.jsonl").write_text(prompt_rows(range(4)))
    (root / "steer_prompts.jsonl").write_text(prompt_rows(range(4, 7)))
    # a rules judge that decides every byte string: a letter a-m validates, else it corrects
    (root / "rules.json").write_text(json.dumps({"rubric": "false-belief", "questions": {
        "validation": {"rules": [{"answer": "VALIDATES", "patterns": ["[a-m]"]}],
                       "default": "CORRECTS"},
        "coherent": {"rules": [{"answer": 0, "patterns": ["(.)\\1\\1"]}], "default": 100}}}))
    (root / "corpus.txt").write_text("Water boils at one hundred degrees at sea level. " * 10)
    (root / "run.toml").write_text(CONFIG.format(model=model, sae=sae))
    return root / "run.toml"


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def statuses(run: Path) -> dict[str, str]:
    return {k: v.status for k, v in read_record(run).stages.items()}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, sae_dir, tmp_path_factory):
    """A project whose run finished once."""
    config = make_root(tmp_path_factory.mktemp("project"), tiny_model_dir, sae_dir)
    run_pipeline(config)
    return config.parent


@pytest.fixture()
def project(finished, tmp_path) -> Path:
    """A copy of the finished project (its run folder included) to change."""
    shutil.copytree(finished, tmp_path / "p")
    return tmp_path / "p" / "run.toml"


@pytest.fixture()
def calls(monkeypatch):
    """Counts the calls of every stage's step and of the model loader."""
    from latentaudit.models import load

    made: list[str] = []
    for name, fn in list(steps.STEPS.items()):
        def counted(ctx, fn=fn, name=name):
            made.append(name)
            return fn(ctx)
        monkeypatch.setitem(steps.STEPS, name, counted)
    real = load.load_model

    def loading(*a, **k):
        made.append("load_model")
        return real(*a, **k)
    monkeypatch.setattr(load, "load_model", loading)
    return made


def test_a_run_from_prompts_writes_every_stage_and_its_record(finished):
    run = finished / "run"
    assert statuses(run) == {"sample": "done", "judge": "done", "pair": "done",
                             "attribute": "done", "explain": "done", "steer": "done",
                             "report": "done"}
    for name in ("completions.jsonl", "judged.jsonl", "dataset.jsonl", "ranking.jsonl",
                 "attribution.safetensors", "explain/latents.jsonl", "steering.jsonl",
                 "steering_summary.json", "steer/completions.jsonl"):
        assert (run / name).is_file(), name
    record = json.loads((run / "pipeline.json").read_text())
    assert record["schema_version"] == 1 and record["entry"] == "prompts"
    assert record["notes"] == ["tiny sizes, for tests"]
    html = (run / "report.html").read_text()
    assert "How this run was made" in html and "tiny sizes, for tests" in html
    assert record["stages"]["report"]["summary"]["path"] == str(run / "report.html")
    assert len(lines(run / "completions.jsonl")) == 16
    stages = record["stages"]
    assert stages["pair"]["summary"]["pairs"] > 0
    assert stages["attribute"]["reads"] == {"pair": stages["pair"]["fingerprint"]}
    assert stages["steer"]["reads"] == {"attribute": stages["attribute"]["fingerprint"]}
    assert all(stages[s]["seconds"] > 0 for s in ("sample", "attribute", "steer"))
    assert "model_load_seconds" in stages["sample"]["summary"]  # the first stage to need it
    assert "loading the model" in html
    # steering drew from its own prompts, none of which attribution saw
    assert {r["prompt_id"] for r in lines(run / "steer" / "completions.jsonl")} == \
        {"q4", "q5", "q6"}


def test_memory_is_handed_back_after_every_stage_that_ran(project, calls, monkeypatch):
    from latentaudit import batching

    made = calls
    monkeypatch.setattr(batching, "release_memory", lambda: made.append("release") or True)
    edit(project, "strengths = [2.0]", "strengths = [2.0, 4.0]")
    run_pipeline(project)
    # steering and the report it reads ran again, each followed by a release; nothing else ran
    assert calls == ["steer", "load_model", "release", "report", "release"]


def test_a_rerun_runs_no_stage_and_loads_no_model(project, calls, capsys):
    assert main(["run", str(project)]) == 0
    assert calls == []
    out = capsys.readouterr().out
    assert "attribute  done" in out and "skip" in out


def test_a_kill_between_stages_resumes_at_the_next_stage(tiny_model_dir, sae_dir, tmp_path,
                                                         monkeypatch):
    config = make_root(tmp_path / "p", tiny_model_dir, sae_dir)

    def killed(ctx):
        raise KeyboardInterrupt

    real = steps.STEPS["explain"]
    monkeypatch.setitem(steps.STEPS, "explain", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config)
    run = config.parent / "run"
    assert statuses(run)["attribute"] == "done" and statuses(run)["explain"] == "partial"
    monkeypatch.setitem(steps.STEPS, "explain", real)
    made = []
    for name, fn in list(steps.STEPS.items()):
        monkeypatch.setitem(steps.STEPS, name, lambda ctx, fn=fn, name=name: made.append(name)
                            or fn(ctx))
    plans = {p.name: p.action for p in run_pipeline(config).plans}
    assert made == ["explain", "steer", "report"]
    assert plans["explain"] == "resume" and plans["attribute"] == "skip"


def test_a_kill_inside_steering_loses_at_most_the_batch_in_flight(project, monkeypatch):
    import latentaudit.steer.generation as G

    edit(project, "strengths = [2.0]", "strengths = [2.0, 4.0]")
    real, batches = G.generate, []

    def dying(loaded, ids, *a, **k):
        if len(batches) == 2:
            raise KeyboardInterrupt
        batches.append(len(ids))
        return real(loaded, ids, *a, **k)

    monkeypatch.setattr(G, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(project)
    run = project.parent / "run"
    assert statuses(run)["steer"] == "partial"
    before = len(lines(run / "steer" / "completions.jsonl"))
    made = []
    monkeypatch.setattr(G, "generate", lambda loaded, ids, *a, **k: made.extend(ids) or
                        real(loaded, ids, *a, **k))
    plans = {p.name: p.action for p in run_pipeline(project).plans}
    assert plans["steer"] == "resume"
    after = lines(run / "steer" / "completions.jsonl")
    # 1 base + 2 methods x 1 latent x 2 strengths, 3 prompts x 2 samples each
    assert len(after) == 5 * 6 and len(made) == len(after) - before
    assert statuses(run)["steer"] == "done"


def test_a_kill_inside_attribution_resumes_from_its_checkpoint(project, monkeypatch):
    import latentaudit.attribution.accumulate as A

    edit(project, "top_k = 8\n", 'top_k = 8\npositions = "completion"\n')
    real, seen = A.forward_backward, []

    def dying(*a, **k):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(1)
        return real(*a, **k)

    monkeypatch.setattr(A, "forward_backward", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(project)
    assert statuses(project.parent / "run")["attribute"] == "partial"
    done = []
    monkeypatch.setattr(A, "forward_backward", lambda *a, **k: done.append(1) or real(*a, **k))
    result = run_pipeline(project)
    manifest = json.loads((result.run / "manifest.json").read_text())
    n_batches = -(-manifest["counts"]["completions"] // 4)
    assert len(done) == n_batches - 2 and manifest["options"]["positions"] == "completion"


def test_a_changed_steering_option_reruns_only_steering(project, calls, monkeypatch):
    import latentaudit.steer.generation as G

    edit(project, "strengths = [2.0]", "strengths = [2.0, 4.0]")
    plans = {p.name: (p.action, p.why) for p in run_pipeline(project, dry_run=True).plans}
    assert [n for n, (a, _) in plans.items() if a == "run"] == ["steer", "report"]
    assert "steer.strengths" in plans["steer"][1]
    made = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda loaded, ids, *a, **k: made.extend(ids) or
                        real(loaded, ids, *a, **k))
    run_pipeline(project)
    assert calls == ["steer", "load_model", "report"]
    # the baseline and strength 2 were kept: only the 2 new conditions x 6 units are sampled
    assert len(made) == 2 * 6
    rows = lines(project.parent / "run" / "steering.jsonl")
    assert sorted({r["strength"] for r in rows}) == [2.0, 4.0]


def test_a_changed_attribution_option_reruns_attribution_and_what_reads_it(project, calls,
                                                                           monkeypatch):
    import latentaudit.attribution.accumulate as A

    edit(project, "top_k = 8", "top_k = 5")
    batches = []
    real = A.forward_backward
    monkeypatch.setattr(A, "forward_backward", lambda *a, **k: batches.append(1) or real(*a, **k))
    result = run_pipeline(project)
    assert calls == ["attribute", "load_model", "explain", "steer", "report"]
    assert batches == []  # top_k does not change the sums: finished from the kept checkpoint
    assert len(lines(result.run / "ranking.jsonl")) == 5
    why = {p.name: p.why for p in result.plans}
    assert "attribute.top_k" in why["attribute"] and "attribute (a stage it reads)" in why["steer"]
    calls.clear()
    edit(project, "n = 4", "n = 4\ntemperature = 0.7")
    assert [p.name for p in run_pipeline(project, dry_run=True).plans if p.action == "run"] == \
        ["sample", "judge", "pair", "attribute", "explain", "steer", "report"]


def test_options_that_do_not_change_results_rerun_nothing(project, calls):
    edit(project, "batch_size = 4\ncheckpoint_every_batches = 1",
         "batch_size = 2\ncheckpoint_every_batches = 3")
    edit(project, 'device = "cpu"', 'device = "auto"')
    run_pipeline(project)
    assert calls == []


def test_a_yaml_config_with_the_same_settings_finds_the_run_done(project):
    import tomllib
    import yaml

    data = tomllib.loads(project.read_text())
    (project.parent / "run.yaml").write_text(yaml.safe_dump(data))
    cfg = read_config(project.parent / "run.yaml")
    plans = plan_stages(cfg, check_inputs(cfg), read_record(cfg.out))
    assert {p.name: p.action for p in plans} == {
        "sample": "skip", "judge": "skip", "pair": "skip", "attribute": "skip",
        "explain": "skip", "steer": "skip", "report": "skip"}


def test_a_run_from_a_dataset_and_redo(tiny_model_dir, sae_dir, tmp_path, calls):
    config = make_root(tmp_path / "p", tiny_model_dir, sae_dir)
    (config.parent / "data.jsonl").write_text(
        "".join(EXAMPLE.read_text().splitlines(keepends=True)[:12]))
    edit(config, 'prompts = "prompts.jsonl"', 'dataset = "data.jsonl"')
    edit(config, "[steer]", "[steer]\nskip = true")
    result = run_pipeline(config)
    assert statuses(result.run) == {"sample": "unused", "judge": "unused", "pair": "given",
                                    "attribute": "done", "explain": "done", "steer": "skipped",
                                    "report": "done"}
    assert calls == ["attribute", "load_model", "explain", "report"]
    assert any("data.jsonl" in n for n in result.notes)
    calls.clear()
    run_pipeline(config, redo=("explain",))
    assert calls == ["explain", "load_model", "report"]


@pytest.mark.parametrize(("old", "new", "message"), [
    ("[steer]\n", "[steer]\nstrenghts = [1.0]\n",
     r"steer.strenghts: unknown key \(did you mean strengths\?\); \[steer\] keys are: "),
    ("n = 4\n", "n = 0\n", "sample.n: n must be a whole number ≥ 1, got 0"),
    ("top_k = 8\n", 'top_k = "ten"\n', "attribute.top_k: must be a whole number, got 'ten'"),
    ('methods = ["attribution", "random"]', 'methods = "attribution"',
     "steer.methods: must be a list of strings, got 'attribution'"),
    ('out = "run"\n', 'out = "run"\nsmaple = 1\n',
     r"smaple: unknown key \(did you mean sample\?\)"),
    ('judge = "rules:rules.json"\n\n', 'judge = "human:nope.csv"\n\n', "judge.judge: "),
    ('prompts = "prompts.jsonl"', 'completions = "missing.jsonl"',
     "completions: .*missing.jsonl: no such file"),
    ("top_k = 8\n", 'top_k = 8\nhook = "mlp_out"\n',
     "attribute.hook: .*reads the hook point resid_post but hook mlp_out was given: pass hook "
     "resid_post"),
])
def test_a_bad_config_is_refused_before_any_model_loads(tiny_model_dir, sae_dir, tmp_path,
                                                        monkeypatch, capsys, old, new, message):
    import re

    import latentaudit.models.load as L

    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    config = make_root(tmp_path / "p", tiny_model_dir, sae_dir)
    text = config.read_text()
    assert old in text
    text = text.replace(old, new, 1)
    config.write_text(text)
    changed = next(x for x in new.splitlines() if x and x not in old.splitlines())
    line = text.splitlines().index(changed) + 1
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(f"run.toml:{line}: {message}", err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (config.parent / "run").exists()


def test_an_option_error_inside_a_stage_names_the_options_key(tiny_model_dir, sae_dir,
                                                              tmp_path, monkeypatch):
    config = make_root(tmp_path / "p", tiny_model_dir, sae_dir)
    (config.parent / "data.jsonl").write_text(
        "".join(EXAMPLE.read_text().splitlines(keepends=True)[:12]))
    edit(config, 'prompts = "prompts.jsonl"', 'dataset = "data.jsonl"')

    def failing(ctx):
        raise OptionError("top_k", "{} is too large for {batch_size}.")
    monkeypatch.setitem(steps.STEPS, "attribute", failing)
    with pytest.raises(LatentAuditError) as err:
        run_pipeline(config)
    line = config.read_text().splitlines().index("top_k = 8") + 1
    assert str(err.value) == f"{config}:{line}: attribute.top_k: top_k is too large for batch_size."


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nout: run\nprompts: false-belief\nsteer:\n  top_k: 0\n")
    with pytest.raises(LatentAuditError, match=r"run.yaml:5: steer.top_k: top_k must be"):
        read_config(path)
    path.write_text("model: m\nsteer: [1\n")
    with pytest.raises(LatentAuditError, match=r"run.yaml:3: not valid YAML"):
        read_config(path)


def test_the_shipped_demo_config_reads():
    from latentaudit.pipeline import DEMO_CONFIG

    cfg = read_config(DEMO_CONFIG, out="x")
    assert cfg.entry == "completions" and cfg.entry_file.is_file()
    assert cfg.settings.notes and cfg.steer is not None and cfg.explain is not None
    assert main(["demo", "--show-config"]) == 0


def test_the_readme_config_example_reads(tmp_path):
    import re

    readme = Path(__file__).parents[1] / "README.md"
    block = re.search(r"```toml\n(.*?)```", readme.read_text(encoding="utf-8"), re.S)[1]
    (tmp_path / "run.toml").write_text(block)
    cfg = read_config(tmp_path / "run.toml")
    assert cfg.entry == "prompts" and cfg.out == tmp_path / "runs" / "false-belief"
    assert cfg.steer.strengths == (0.5,) and cfg.sample.n == 8 and not cfg.report


@pytest.mark.embedded
def test_the_demo_dry_run_checks_every_input_and_loads_no_model(tmp_path, capsys, monkeypatch):
    import latentaudit.models.load as L
    from latentaudit.models import embedded

    if not (embedded.is_installed("qwen2.5-0.5b-instruct")
            or embedded.is_cached("qwen2.5-0.5b-instruct")):
        pytest.skip("qwen2.5-0.5b-instruct is not installed")
    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["demo", "--dry-run", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "sample     given" in out
    assert all(f"{s:<10} run" in out for s in ("judge", "attribute", "explain", "circuit",
                                                "steer"))
    assert not (tmp_path / "demo").exists()


def test_a_second_run_on_a_busy_folder_is_refused(project):
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (project.parent / "run" / ".pipeline.lock").write_text(str(sleeper.pid))
        with pytest.raises(LatentAuditError, match=f"in use by another latentaudit run "
                                                   f"\\(process {sleeper.pid}\\)"):
            run_pipeline(project)
    finally:
        sleeper.kill()
        sleeper.wait()
    run_pipeline(project)  # a lock left by a process that died is taken over
    assert not (project.parent / "run" / ".pipeline.lock").exists()


def test_sigterm_stops_a_run_as_ctrl_c_does():
    import os
    import signal

    from latentaudit.cli.run import stop_on_sigterm

    old = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, old)
