"""`latentaudit monitor` end to end on a tiny model: fit → save → load → score, refusals,
resuming, streaming memory, and the evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.monitor.file import load_monitor, sae_digest
from tiny import random_sae

STANCES = {"positive": ["Yes, that is right.", "Yes! Exactly so, my friend.", "Yes, true."],
           "negative": ["No, that is wrong.", "No! Not so at all.", "No, false, sorry."]}


def rows(prompts: range, extra: dict | None = None) -> list[dict]:
    out = []
    for p in prompts:
        for outcome, texts in STANCES.items():
            for j, text in enumerate(texts):
                out.append({"prompt_id": f"p{p}", "prompt": f"Claim {p}: cats bark, right?",
                            "sample_index": len(out) % 6, "completion": f"{text} ({j})",
                            "outcome": outcome, **(extra or {})})
    return out


def write(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return random_sae(32, 64, layer=1, seed=4).save(tmp_path_factory.mktemp("sae"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, sae_dir):
    """A hand-made attribution run folder (prompts p0..p3 were attributed)."""
    from latentaudit._io import save_safetensors, write_json

    folder = tmp_path_factory.mktemp("run")
    dataset = write(folder / "dataset.jsonl", [
        {**{k: v for k, v in r.items() if k != "outcome"}, "label": r["outcome"]}
        for r in rows(range(4))])
    g = torch.Generator().manual_seed(0)
    save_safetensors(folder / "attribution.safetensors",
                     {"delta_attribution": torch.randn(64, generator=g),
                      "delta_activation": torch.randn(64, generator=g)})
    write_json(folder / "manifest.json", {
        "schema_version": 1, "layers": [1], "model": {"name": str(tiny_model_dir)},
        "saes": {"1": {"path": str(sae_dir)}}, "dataset": {"path": str(dataset)}})
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model_dir, sae_dir, run_dir):
    folder = tmp_path_factory.mktemp("fit")
    train = write(folder / "judged.jsonl", rows(range(4, 10)))
    out = folder / "monitor.safetensors"
    rc = main(["monitor", "fit", "--completions", str(train), "--run", str(run_dir),
               "--top-k", "5", "--reduce", "mean", "max", "--folds", "3", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    return out


def test_fit_writes_a_monitor_file_that_loads_back(fitted, run_dir, sae_dir, tiny_model_dir):
    from safetensors import safe_open

    from latentaudit.monitor.inputs import read_run

    mon = load_monitor(fitted)
    assert mon.latents == read_run(run_dir).top(5)
    assert mon.reduce == ["mean", "max"] and mon.weight.shape == (10,)
    assert 0 <= mon.threshold <= 1 and mon.layer == 1
    assert mon.model["name"] == str(tiny_model_dir) and mon.model["d_model"] == 32
    from latentaudit.saes import load_sae

    assert mon.sae["digest"] == sae_digest(load_sae(sae_dir)) and mon.sae["d_sae"] == 64
    assert mon.fit["completions"]["positive"] == 18 and mon.fit["latents_from"]["top_k"] == 5
    with safe_open(str(fitted), framework="pt") as f:
        header = json.loads(f.metadata()["latentaudit_monitor"])
    assert header["schema_version"] == 1 and header["format"] == "latentaudit-monitor"
    assert header["latents"] == mon.latents and header["weights"] == pytest.approx(
        mon.weight.tolist())
    again = mon.save(fitted.with_name("copy.safetensors"))
    assert load_monitor(again).digest() == mon.digest()


def test_score_equals_a_direct_computation_and_resumes(fitted, tiny_model_dir, sae_dir,
                                                       tmp_path, capsys):
    from latentaudit.models.load import load_model
    from latentaudit.monitor.read import encode, read_reductions, to_completion
    from latentaudit.saes import load_sae

    data = rows(range(20, 23), {"meta": {"note": "x"}})
    for r in data:
        del r["outcome"]  # new completions carry no grade
    new = write(tmp_path / "new.jsonl", data)
    out = tmp_path / "scored.jsonl"
    assert main(["monitor", "score", "--monitor", str(fitted), "--completions", str(new),
                 "--out", str(out), "--chunk", "4", "--device", "cpu"]) == 0
    assert "scored 18 completion(s)" in capsys.readouterr().out
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["completion"] for r in scored] == [r["completion"] for r in data]
    assert scored[0]["meta"] == {"note": "x"}

    mon = load_monitor(fitted)
    lm = load_model(str(tiny_model_dir), device="cpu")
    sae = load_sae(sae_dir, dtype="fp32")
    comps = [to_completion(r, "new", n) for n, r in enumerate(data, start=1)]
    red = read_reductions(lm, sae, 1, encode(lm.tokenizer, comps, None),
                          torch.tensor(mon.latents), desc=None)
    x = torch.cat([red.latent_mean, red.latent_max], 1)
    direct = torch.sigmoid(x @ mon.weight + mon.bias)
    got = torch.tensor([r["monitor"]["score"] for r in scored])
    assert torch.allclose(got, direct, atol=1e-5)
    assert [r["monitor"]["flag"] for r in scored] == (direct >= mon.threshold).tolist()
    assert list(scored[0]["monitor"]["latents"]) == [str(i) for i in mon.latents]

    # killed after 7 rows, in the middle of writing the 8th: the rerun finishes the same file
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:20])
    assert main(["monitor", "score", "--monitor", str(fitted), "--completions", str(new),
                 "--out", str(out), "--chunk", "4", "--device", "cpu"]) == 0
    assert "scored 11 completion(s) (7 already" in capsys.readouterr().out
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["monitor"]["line"] for r in again] == list(range(1, 19))
    assert [r["completion"] for r in again] == [r["completion"] for r in data]
    # other batches pad differently: equal up to float rounding
    assert torch.allclose(torch.tensor([r["monitor"]["score"] for r in again]), got, atol=1e-5)


def test_score_refuses_another_sae_model_or_layer(fitted, tmp_path, capsys):
    new = write(tmp_path / "new.jsonl", rows(range(30, 31)))
    other = random_sae(32, 64, layer=1, seed=9).save(tmp_path / "other-sae")
    base = ["monitor", "score", "--monitor", str(fitted), "--completions", str(new),
            "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"]
    assert main(base + ["--sae", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is a different SAE" in err and "fit a monitor for this SAE" in err
    assert main(base + ["--model", "qwen2.5-0.5b-instruct"]) == 2
    assert "--model is 'qwen2.5-0.5b-instruct'" in capsys.readouterr().err
    assert main(base + ["--layer", "0"]) == 2
    assert "reads layer 1 but --layer is 0" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_score_checks_every_line_before_the_model_loads(fitted, tmp_path, monkeypatch):
    import latentaudit.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n{oops\n"
                   + json.dumps({"prompt": "q", "completion": 3}) + "\n")
    from latentaudit.monitor.score import run_score

    with pytest.raises(LatentAuditError, match=r"bad.jsonl:2: not valid JSON") as err:
        run_score(fitted, bad, tmp_path / "o.jsonl")
    assert "bad.jsonl:3: field 'completion'" in str(err.value)


def test_a_tampered_monitor_file_is_refused(fitted, tmp_path):
    from safetensors import safe_open

    from latentaudit._io import save_safetensors

    with safe_open(str(fitted), framework="pt") as f:
        meta = json.loads(f.metadata()["latentaudit_monitor"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["weights"][0] += 1.0
    path = tmp_path / "tampered.safetensors"
    save_safetensors(path, tensors, {"latentaudit_monitor": json.dumps(meta)})
    with pytest.raises(LatentAuditError, match="'weights' does not match"):
        load_monitor(path)
    meta["schema_version"] = 99
    save_safetensors(path, tensors, {"latentaudit_monitor": json.dumps(meta)})
    with pytest.raises(LatentAuditError, match="schema_version"):
        load_monitor(path)


@pytest.mark.slow  # nested cross-validation of nine latent sets and the probe
def test_evaluate_writes_the_table_json_latents_and_figure(run_dir, tmp_path):
    from latentaudit.monitor.evaluate import EvalConfig, run_evaluation

    held = write(tmp_path / "held.jsonl", rows(range(10, 16)) + [
        {**rows(range(16, 17))[0], "outcome": "excluded"}])
    train = write(tmp_path / "train.jsonl", rows(range(4, 10)))
    cfg = EvalConfig(top_k=(2, 3), folds=3, bootstrap=30, random_draws=2)
    out = tmp_path / "eval"
    res = run_evaluation(held, out, cfg, run=run_dir, latents=[5, 7], train=train,
                         device="cpu")
    assert res["counts"]["completions"] == 36 and res["counts"]["excluded"] == 1
    methods = [(s["method"], s["k"]) for s in res["sets"]]
    assert methods == [("Δ-attribution", 2), ("Δ-activation", 2), ("random", 2), ("random", 2),
                       ("Δ-attribution", 3), ("Δ-activation", 3), ("random", 3), ("random", 3),
                       ("given", 2)]
    for s in res["sets"]:
        for mode in ("cv", "transfer"):
            c = s["combination"][mode]
            assert 0 <= c["auc"] <= 1 and len(c["roc"]["fpr"]) == len(c["roc"]["tpr"])
    assert set(res["probe"]) == {"cv", "transfer"}
    table = (out / "auc_table.md").read_text()
    assert "| Δ-attribution top-2 | 2 |" in table and "residual probe" in table
    assert "random (2 draws)" in table
    latents = [json.loads(x) for x in (out / "latents.jsonl").read_text().splitlines()]
    assert {r["method"] for r in latents} == {"Δ-attribution", "Δ-activation", "given"}
    assert (out / "monitor_eval.json").is_file() and (out / "features.safetensors").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "roc.png").stat().st_size > 0 and (out / "roc.svg").is_file()


def test_evaluate_refuses_attributed_prompts_before_the_model_loads(run_dir, tmp_path,
                                                                    monkeypatch):
    import latentaudit.models.load as load
    from latentaudit.monitor.evaluate import EvalConfig, run_evaluation

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(LatentAuditError, match="also used by the attribution run"):
        run_evaluation(write(tmp_path / "leak.jsonl", rows(range(3, 12))), tmp_path / "e2",
                       EvalConfig(), run=run_dir, device="cpu")
    with pytest.raises(LatentAuditError, match="--top-k must be whole numbers"):
        EvalConfig(top_k=(0,))


@pytest.mark.slow  # scores a few thousand rows under tracemalloc
def test_streamed_scoring_keeps_memory_flat(fitted, tmp_path):
    import tracemalloc

    from latentaudit.monitor.score import run_score

    pad = "z" * 4000  # each row carries 4 kB of meta: holding the file would show

    def peak(n_prompts: int) -> tuple[int, int]:
        data = rows(range(n_prompts), {"meta": {"pad": pad}})
        src = write(tmp_path / f"in{n_prompts}.jsonl", data)
        tracemalloc.start()
        s = run_score(fitted, src, tmp_path / f"out{n_prompts}.jsonl", chunk=16, device="cpu")
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert s.scored == len(data)
        return top, src.stat().st_size

    small, small_size = peak(10)
    large, large_size = peak(160)  # 16× the rows
    assert large_size > 2_000_000
    assert large < small + 1_000_000, (small, large)  # not O(file): ~4 MB would be added
    assert large < large_size / 2
