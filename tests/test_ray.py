"""The Ray engine (``--engine ray``) on a local 2-CPU cluster: the same results as the local
path, nothing lost when a worker dies, and joining an existing cluster.

The cluster is started once for the module (:func:`cluster`; every test that uses it is
marked slow and skips when Ray is not installed); a pool inside it only adds workers. Workers
that die are made by :func:`logging_worker`, a subclass of the pool's worker that exits its own
process in a chosen task the first time (a marker file remembers it), and that logs which tasks
it ran.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentaudit.cli import main
from latentaudit.distributed import EngineConfig
from latentaudit.errors import LatentAuditError
from test_steer import run_dir  # noqa: F401  (the hand-made attribution run of the sweep tests)
from tiny import random_sae

EXAMPLE = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"
PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"Is claim {i} true?", "fact": f"Claim {i} is false."}
           for i in range(5)]


# ---- option errors (no cluster) ---------------------------------------------------------------

@pytest.mark.parametrize(("flags", "error"), [
    (["--engine", "spark"], "--engine 'spark' is not one of local, ray."),
    (["--ray-address", "head:6379"], "--ray-address needs --engine ray."),
    (["--engine", "ray", "--ray-workers", "0"], "--ray-workers must be a whole number ≥ 1"),
])
def test_bad_engine_options_are_one_error(tmp_path, capsys, flags, error):
    argv = ["attribute", "--model", "m", "--sae", "s", "--data", str(EXAMPLE),
            "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(error) or error in err
    assert len(err.splitlines()) == 1


def test_ray_not_installed_is_one_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    for command in (["sample", "--model", "m", "--prompts", "false-belief", "--out",
                     str(tmp_path / "c.jsonl")],
                    ["attribute", "--model", "m", "--sae", "s", "--data", str(EXAMPLE),
                     "--out", str(tmp_path / "run")]):
        assert main([*command, "--engine", "ray"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err]
        assert "--engine ray needs the Python package 'ray'" in err
        assert 'pip install "latentaudit[ray]"' in err
    with pytest.raises(LatentAuditError, match="latentaudit\\[ray\\]"):
        import latentaudit as la

        la.attribute("m", "s", EXAMPLE, engine=EngineConfig("ray"))


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for the module (or the one at $RAY_ADDRESS, started with
    ``ray start --head --num-cpus 2``); its address for other drivers."""
    ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray")
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(logging_level=logging.WARNING)
    else:
        for attempt in range(3):  # Ray gives its node 30 s to start: a busy machine may need more
            try:
                ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                               logging_level=logging.WARNING)
                break
            except Exception as err:
                ray.shutdown()
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae")
    random_sae(32, 64, layer=1).save(folder)
    return folder


@pytest.fixture
def one_thread():
    """The local reference on one thread, as each Ray worker runs (same float32 kernels)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logging_worker(log: Path, die_in: str | None = None, die_at: int = 0,
                   marker: Path | None = None):
    """A worker class that logs each task (function name and first argument) to ``log`` and
    exits its process in the ``die_at``-th call of ``die_in`` (counted in the log), once."""
    from latentaudit.distributed.pool import Worker

    class LoggingWorker(Worker):
        def call(self, fn, key, holder, args):
            with open(log, "a") as f:
                f.write(json.dumps([fn.__name__, repr(args[0])[:40]]) + "\n")
            ran = [json.loads(x)[0] for x in open(log).read().splitlines()]
            if fn.__name__ == die_in and ran.count(die_in) > die_at and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().call(fn, key, holder, args)

    return LoggingWorker


def ran(log: Path, name: str) -> list[str]:
    return [a for f, a in (json.loads(x) for x in log.read_text().splitlines()) if f == name]


# ---- attribution ------------------------------------------------------------------------------

def attribute_argv(model, sae, out, *extra) -> list[str]:
    return ["attribute", "--model", str(model), "--sae", str(sae), "--data", str(EXAMPLE),
            "--out", str(out), "--batch-size", "4", "--top-k", "20", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, sae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(attribute_argv(tiny_model_dir, sae_dir, out)) == 0
    finally:
        torch.set_num_threads(before)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "attribution.safetensors"), load_file(b / "attribution.safetensors")
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert (a / "ranking.jsonl").read_text() == (b / "ranking.jsonl").read_text()
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert ma["counts"] == mb["counts"] and ma["options"] == mb["options"]


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("workers", [1, 2])
def test_attribution_on_workers_equals_the_local_run(tiny_model_dir, sae_dir, local_run,
                                                     tmp_path, workers, capsys):
    out = tmp_path / "run"
    assert main(attribute_argv(tiny_model_dir, sae_dir, out, "--engine", "ray",
                               "--ray-workers", str(workers))) == 0
    assert "32 completions, 32 pairs from 8 prompts" in capsys.readouterr().out
    assert_same_run(local_run, out)
    assert not (out / "attribute.shards").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("cluster", "one_thread")
def test_attribution_float64_sums_match_the_local_loop(tiny_model_dir, sae_dir):
    import latentaudit as la
    from latentaudit.attribution import AttributionConfig

    cfg = AttributionConfig(batch_size=4)
    ref = la.attribute(str(tiny_model_dir), str(sae_dir), EXAMPLE, cfg, device="cpu")
    got = la.attribute(str(tiny_model_dir), str(sae_dir), EXAMPLE, cfg, device="cpu",
                       engine=EngineConfig("ray", ray_workers=2))
    a, b = ref.layers[1], got.layers[1]
    assert torch.equal(a.delta_attribution, b.delta_attribution)
    assert torch.equal(a.moment_matrix, b.moment_matrix)
    assert ref.completion_losses == got.completion_losses
    assert (ref.n_tokens, ref.n_pairs) == (got.n_tokens, got.n_pairs)
    assert ref.ranking == got.ranking


@pytest.mark.slow
@pytest.mark.usefixtures("cluster", "one_thread")
def test_attribution_rerun_computes_only_missing_shards(tiny_model_dir, sae_dir, tmp_path,
                                                        monkeypatch):
    import latentaudit as la
    from latentaudit.attribution import AttributionConfig
    from latentaudit.distributed import pool

    cfg, shards = AttributionConfig(batch_size=4), tmp_path / "shards"
    engine = EngineConfig("ray", ray_workers=2)
    ref = la.attribute(str(tiny_model_dir), str(sae_dir), EXAMPLE, cfg, device="cpu",
                       engine=engine, checkpoint=shards)
    files = sorted(shards.glob("batches-*.safetensors"))
    assert len(files) == 8  # 8 batches, 2 workers: one batch per shard
    for f in files[2:5]:
        f.unlink()
    log = tmp_path / "tasks.log"
    monkeypatch.setattr(pool, "Worker", logging_worker(log))
    got = la.attribute(str(tiny_model_dir), str(sae_dir), EXAMPLE, cfg, device="cpu",
                       engine=engine, checkpoint=shards)
    assert sorted(ran(log, "_shard")) == ["2", "3", "4"]
    assert torch.equal(ref.layers[1].delta_attribution, got.layers[1].delta_attribution)


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_attribution_worker_killed_mid_run_loses_nothing(tiny_model_dir, sae_dir, local_run,
                                                         tmp_path, monkeypatch, capsys):
    from latentaudit.distributed import pool

    log, marker = tmp_path / "tasks.log", tmp_path / "died"
    monkeypatch.setattr(pool, "Worker", logging_worker(log, "_shard", 3, marker))
    # Ray restarts the worker and retries its shard
    out = tmp_path / "retried"
    assert main(attribute_argv(tiny_model_dir, sae_dir, out, "--engine", "ray",
                               "--ray-workers", "2")) == 0
    assert marker.exists()
    assert_same_run(local_run, out)
    # no retries: the run stops with one error, keeps its finished shards, a rerun finishes
    marker.unlink()
    log.unlink()
    out = tmp_path / "rerun"
    argv = attribute_argv(tiny_model_dir, sae_dir, out, "--engine", "ray", "--ray-workers", "2")
    assert main([*argv, "--ray-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "a Ray worker died during attribute after 0 restart(s)" in err
    assert "rerun the same command" in err
    kept = len(list((out / "attribute.shards").glob("batches-*")))
    assert kept >= 2  # the 4th shard started only once two had finished (and were saved)
    log.write_text("")
    assert main(argv) == 0
    assert len(ran(log, "_shard")) == 8 - kept  # the rerun does only the missing shards
    assert_same_run(local_run, out)


# ---- sampling ---------------------------------------------------------------------------------

def sample_argv(model, prompts, out, *extra) -> list[str]:
    return ["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
            "--n", "2", "--max-new-tokens", "6", "--batch-size", "3", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local_sample(tiny_model_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "c.jsonl"
    assert main(sample_argv(tiny_model_dir, prompts_file, out)) == 0
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_sampling_on_workers_equals_local_sampling(tiny_model_dir, prompts_file, local_sample,
                                                   tmp_path):
    out = tmp_path / "c.jsonl"
    assert main(sample_argv(tiny_model_dir, prompts_file, out, "--engine", "ray")) == 0
    assert out.read_bytes() == local_sample.read_bytes()  # same rows, same order
    manifest = json.loads(out.with_name("c.manifest.json").read_text())
    assert manifest["n"] == 2 and manifest["model"] == str(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_sampling_worker_killed_mid_run_loses_nothing(tiny_model_dir, prompts_file,
                                                      local_sample, tmp_path, monkeypatch):
    from latentaudit.distributed import pool

    log, marker = tmp_path / "tasks.log", tmp_path / "died"
    monkeypatch.setattr(pool, "Worker", logging_worker(log, "_rows", 1, marker))
    out = tmp_path / "c.jsonl"
    argv = sample_argv(tiny_model_dir, prompts_file, out, "--engine", "ray", "--ray-workers", "2")
    assert main([*argv, "--ray-retries", "0"]) == 2
    assert marker.exists()
    assert len(out.read_text().splitlines()) < 10
    assert main(argv) == 0
    assert out.read_bytes() == local_sample.read_bytes()


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_ray_address_joins_an_existing_cluster(cluster, tiny_model_dir, prompts_file,
                                               local_sample, tmp_path):
    import ray

    out = tmp_path / "c.jsonl"
    argv = sample_argv(tiny_model_dir, prompts_file, out, "--engine", "ray",
                       "--ray-address", cluster, "--ray-workers", "1")
    env = {**os.environ, "LATENTAUDIT_QUIET": "1"}
    done = subprocess.run([sys.executable, "-m", "latentaudit", *argv], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == local_sample.read_bytes()
    assert ray.cluster_resources()["CPU"] == 2  # the cluster outlives the driver that joined it


# ---- judging and steering ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_judging_on_workers_equals_local_judging(local_sample, tmp_path):
    judged = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine / "judged.jsonl"
        assert main(["judge", "--completions", str(local_sample), "--rubric", "false-belief",
                     "--judge", "rules", "--out", str(out), "--engine", engine]) == 0
        judged[engine] = out.read_text()
        assert len((out.parent / "judge_cache.jsonl").read_text().splitlines()) >= 1
    assert judged["local"] == judged["ray"]


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_steering_sweep_on_workers_equals_the_local_sweep(run_dir):  # noqa: F811
    from test_steer import lines, sweep_args

    other = run_dir.parent / "run2"
    shutil.copytree(run_dir, other)
    assert main(sweep_args(run_dir)) == 0
    assert main(sweep_args(other, "--engine", "ray", "--ray-workers", "2")) == 0

    def by_key(run: Path) -> dict:
        return {(g["key"], g["prompt_id"], g["sample_index"]): g
                for g in lines(run / "steer" / "completions.jsonl")}

    assert by_key(run_dir) == by_key(other)
    assert lines(run_dir / "steering.jsonl") == lines(other / "steering.jsonl")




# ---- pure parts: shard ranges, merging top-k states -------------------------------------------

def test_shard_ranges_cover_what_is_missing_once():
    from latentaudit.distributed.attribute import missing_ranges, shard_size, split_ranges

    assert shard_size(8, 2, 20) == 1 and shard_size(100, 2, 20) == 13
    assert shard_size(100, 1, 5) == 5 and shard_size(3, 4, 0) == 1
    assert missing_ranges(10, []) == [(0, 10)]
    assert missing_ranges(10, [(2, 4), (0, 1), (8, 10)]) == [(1, 2), (4, 8)]
    assert split_ranges([(1, 2), (4, 9)], 2) == [(1, 2), (4, 6), (6, 8), (8, 9)]


def test_merging_two_parts_keeps_what_one_pass_keeps():
    from latentaudit.explain.topk import (
        add_density,
        empty_density,
        empty_topk,
        merge_states,
        merge_topk,
        update_density,
    )

    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(6, 10, 5, generator=g))  # (B, T, S)
    ids = torch.randint(0, 50, (6, 10), generator=g)
    valid = torch.ones(6, 10, dtype=torch.bool)
    seq = torch.arange(6)

    def scan(rows):
        top = merge_topk(empty_topk(5, 4, 2, 1), acts[rows], ids[rows], valid[rows], seq[rows],
                         2, 1)
        return top, update_density(empty_density(5), acts[rows][valid[rows]])

    whole, whole_d = scan(slice(0, 6))
    (a, ad), (b, bd) = scan(slice(0, 2)), scan(slice(2, 6))
    merged = merge_states(a, b)
    for x, y in zip(whole, merged, strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(whole_d, add_density(ad, bd), strict=True))


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_top_example_scan_on_workers_equals_the_local_pass(tiny_model_dir, tmp_path):
    from latentaudit.distributed.examples import corpus_examples_ray
    from latentaudit.distributed.pool import WorkerPool
    from latentaudit.explain import ExplainConfig
    from latentaudit.explain import examples as ex
    from latentaudit.models.load import load_model

    rng = random.Random(0)  # varied text, with lines repeated: equal activations (ties) too
    lines = [" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 8)))
                      for _ in range(30)) for _ in range(14)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines + lines[:6]))
    cfg = ExplainConfig(corpus=str(corpus), corpus_tokens=1500, context_len=32, batch_size=4,
                        examples=5)
    loaded = load_model(str(tiny_model_dir), device="cpu")
    sae = random_sae(32, 64, layer=1)
    ref = ex.corpus_examples(loaded, sae, 1, cfg, "k", tmp_path / "local")
    with WorkerPool(EngineConfig("ray", ray_workers=2), device="cpu") as pool:
        got = corpus_examples_ray(pool, loaded, sae, 1, cfg, "k", tmp_path / "ray",
                                  checkpoint_seconds=0)
    assert (got.tokens, got.sequences) == (ref.tokens, ref.sequences)
    assert torch.equal(got.top.values, ref.top.values)
    for name in ("sequence", "position", "window_ids", "window_acts"):
        assert torch.equal(getattr(got.top, name), getattr(ref.top, name)), name
    assert torch.equal(got.density.histogram, ref.density.histogram)
    assert ex.read_cache(got.path, "k")[4]  # the cache says finished, in the local format
