"""Steering: the hook (α = 0 changes nothing, no hook left behind, KV cache = no cache, per-row
conditions = separate runs, a planted direction moves the output), the log-odds check against a
direct computation, the statistics on hand-built data, and the sweep end to end (CLI, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.generate import generate
from latentaudit.models.hooks import RowSteering, layer_list, steer_resid
from latentaudit.models.load import load_model
from latentaudit.runfolder import SteeringRow
from latentaudit.sample import SampleConfig
from latentaudit.steer import stats
from latentaudit.steer.config import Condition, SteerConfig
from latentaudit.steer.logodds import Signature, log_odds, log_odds_rows, signature_ids
from tiny import random_sae, tiny_tokenizer

EOS = 257
LAYER = 1


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def prompts(tok) -> list[list[int]]:
    texts = ["Is the earth flat?", "Hi", "Tell me a story about a cat", "ok"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def no_hooks(model) -> bool:
    return all(not m._forward_hooks for m in layer_list(model))


def vectors(n: int, d: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


# ---- the hook --------------------------------------------------------------------------------

def test_alpha_zero_gives_the_completions_of_no_hook(loaded):
    ids = prompts(loaded.tokenizer)
    cfg = SampleConfig(max_new_tokens=10, temperature=1.0)
    seeds = [11, 12, 13, 14]
    plain = generate(loaded, ids, seeds, cfg)
    zero = generate(loaded, ids, seeds, cfg,
                    steering=RowSteering(LAYER, torch.zeros(4, loaded.d_model)))
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    assert no_hooks(loaded.model)
    steered = generate(loaded, ids, seeds, cfg,
                       steering=RowSteering(LAYER, vectors(4, loaded.d_model, 20.0)))
    assert [g.token_ids for g in steered] != [g.token_ids for g in plain]  # the test can fail


def test_no_hook_is_left_after_an_exception(loaded):
    ids = prompts(loaded.tokenizer)
    with pytest.raises(LatentAuditError, match="one vector per batch row"):
        generate(loaded, ids, [1, 2, 3, 4], SampleConfig(max_new_tokens=3),
                 steering=RowSteering(LAYER, torch.zeros(3, loaded.d_model)))
    assert no_hooks(loaded.model)
    with pytest.raises(KeyError), steer_resid(loaded.model, RowSteering(0, torch.zeros(1, 32))):
        assert not no_hooks(loaded.model)
        raise KeyError("boom")
    assert no_hooks(loaded.model)


def _greedy_without_cache(loaded, prompt: list[int], vector: torch.Tensor, n: int) -> list[int]:
    """Independent reference: a full forward of the whole sequence at every step, no cache."""
    out: list[int] = []
    with steer_resid(loaded.model, RowSteering(LAYER, vector[None])), torch.no_grad():
        for _ in range(n):
            x = torch.tensor([prompt + out])
            nxt = int(loaded.model(input_ids=x, use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == EOS:
                break
    return out


def test_steered_generation_with_kv_cache_equals_without_cache(loaded):
    ids = prompts(loaded.tokenizer)
    vecs = vectors(4, loaded.d_model, 6.0, seed=3)
    vecs[1] = 0
    got = generate(loaded, ids, [0] * 4, SampleConfig(max_new_tokens=8, temperature=0),
                   steering=RowSteering(LAYER, vecs))
    for b in range(4):
        assert got[b].token_ids == _greedy_without_cache(loaded, ids[b], vecs[b], 8)


def test_per_row_conditions_in_one_batch_equal_separate_runs(loaded):
    ids = prompts(loaded.tokenizer) * 2
    vecs = vectors(8, loaded.d_model, 8.0, seed=5)
    # stop strings end rows at different steps, so finished rows leave the batch mid-way
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, stop=tuple("aeiouAEIOU "))
    seeds = list(range(100, 108))
    together = generate(loaded, ids, seeds, cfg, steering=RowSteering(LAYER, vecs))
    assert len({len(g.token_ids) for g in together}) > 2
    for b in range(8):
        alone = generate(loaded, [ids[b]], [seeds[b]], cfg,
                         steering=RowSteering(LAYER, vecs[b:b + 1]))
        assert alone[0].token_ids == together[b].token_ids


def test_samples_of_one_prompt_and_condition_share_a_prefill_with_the_same_result(loaded):
    from latentaudit.generate import distinct_rows

    base = prompts(loaded.tokenizer)
    ids = [base[0], base[0], base[2], base[0], base[2], base[1]]
    v, w = vectors(2, loaded.d_model, 8.0, seed=3)
    vecs = torch.stack([v, v, v, w, v, v])
    steering = RowSteering(LAYER, vecs)
    # rows 0 and 1 share (prompt 0, v); rows 2 and 4 share (prompt 2, v); row 3 differs by w
    assert distinct_rows(ids, steering) == ([0, 2, 3, 5], [0, 0, 1, 2, 1, 3])
    assert distinct_rows(ids, None) == ([0, 2, 5], [0, 0, 1, 0, 1, 2])
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, stop=tuple("aeiouAEIOU "))
    seeds = list(range(200, 206))
    together = generate(loaded, ids, seeds, cfg, steering=steering)
    for b in range(6):
        alone = generate(loaded, [ids[b]], [seeds[b]], cfg,
                         steering=RowSteering(LAYER, vecs[b:b + 1]))
        assert alone[0].token_ids == together[b].token_ids
    assert torch.equal(steering.vectors, vecs) and no_hooks(loaded.model)


def _self_preferring_token(model) -> int:
    """A token X whose unembedding row w_X gives X the largest logit when fed as the input."""
    W = model.get_output_embeddings().weight.detach()
    for x in range(W.shape[0]):
        if int((W @ W[x]).argmax()) == x and x != EOS:
            return x
    raise AssertionError("no self-preferring token")


def test_a_planted_direction_moves_the_output_the_expected_way(loaded):
    x = _self_preferring_token(loaded.model)
    w = loaded.model.get_output_embeddings().weight.detach()[x]
    ids = prompts(loaded.tokenizer)
    vecs = (w / w.norm() * 500.0).expand(4, -1).clone()
    got = generate(loaded, ids, [0] * 4, SampleConfig(max_new_tokens=5, temperature=0),
                   steering=RowSteering(LAYER, vecs))
    assert all(g.token_ids == [x] * 5 for g in got)
    sig = Signature((x,), (EOS,), ())
    away = log_odds_rows(loaded, LAYER, ids, -vecs, torch.arange(4), sig, 2)
    toward = log_odds_rows(loaded, LAYER, ids, vecs, torch.arange(4), sig, 3)
    base = log_odds_rows(loaded, LAYER, ids, vecs * 0, torch.arange(4), sig, 4)
    assert (toward > base).all() and (away < base).all()


# ---- the log-odds check ----------------------------------------------------------------------

def test_log_odds_rows_equal_a_direct_two_forward_computation(loaded):
    ids = prompts(loaded.tokenizer)
    sig = Signature((10, 20, 30), (40, 50), ())
    vecs = vectors(6, loaded.d_model, 3.0, seed=9)
    which = torch.tensor([0, 1, 2, 3, 0, 2])
    got = log_odds_rows(loaded, LAYER, ids, vecs, which, sig, batch_size=4)
    layer = layer_list(loaded.model)[LAYER]
    for r in range(6):
        def add(module, args, output, v=vecs[r]):
            return (output[0] + v, *output[1:]) if isinstance(output, tuple) else output + v
        handle = layer.register_forward_hook(add)
        try:
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([ids[int(which[r])]])).logits[0, -1]
        finally:
            handle.remove()
        logp = torch.log_softmax(logits.double(), -1)
        want = torch.logsumexp(logp[[10, 20, 30]], 0) - torch.logsumexp(logp[[40, 50]], 0)
        assert float(got[r]) == pytest.approx(float(want), abs=1e-5)


def test_log_odds_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert float(log_odds(logits, [0, 1], [3])[0]) == pytest.approx(np.log(0.3 / 0.4))


def test_signature_drops_tokens_that_open_both_sides():
    tok = tiny_tokenizer()
    sig = signature_ids(tok, {"positive": ["Yes", "That's right"],
                              "negative": ["No", "That's a myth"]})
    first = {c: tok(c)["input_ids"][0] for c in "YNT"}
    assert (sig.positive, sig.negative, sig.dropped) == ((first["Y"],), (first["N"],),
                                                         (first["T"],))
    with pytest.raises(LatentAuditError, match="distinct opening word"):
        signature_ids(tok, {"positive": ["Yes"], "negative": ["Yeah"]})


def test_rubric_first_token_field_is_checked(tmp_path):
    from latentaudit.judges.rubrics import load_rubric

    spec = json.loads((Path(load_rubric("false-belief").source)).read_text())
    assert load_rubric("false-belief").first_token["negative"][0] == "No"
    spec["first_token"] = {"positive": ["Yes"]}
    (tmp_path / "r.json").write_text(json.dumps(spec))
    for q in spec["questions"]:
        src = Path(load_rubric("false-belief").source).parent / q["template"]
        (tmp_path / q["template"]).write_text(src.read_text())
    with pytest.raises(LatentAuditError, match="r.json: field 'first_token'"):
        load_rubric(tmp_path / "r.json")


# ---- statistics ------------------------------------------------------------------------------

def test_rate_and_paired_difference_by_hand():
    clusters = ["a", "a", "b", "b", "c", "c"]
    steered = [1, 0, None, 1, 0, 0]
    base = [1, 1, 1, 1, None, 1]
    r = stats.rate(steered, clusters, n_boot=200)
    assert r.value == pytest.approx(2 / 5) and r.n == 5
    d = stats.paired_difference(steered, base, clusters, n_boot=200)
    # units decided in both: (1-1), (0-1), (1-1), (0-1) -> mean -0.5
    assert d.value == pytest.approx(-0.5) and d.n == 4
    assert d.lo <= d.value <= d.hi


def test_cluster_bootstrap_equals_explicit_resampling():
    rng = np.random.default_rng(0)
    clusters = [f"p{i}" for i in range(7) for _ in range(3)]
    values = rng.integers(0, 2, size=len(clusters)).astype(float).tolist()
    sums, counts = stats.cluster_sums(values, clusters)
    weights = stats.draw_weights(7, 300, seed=4)
    est = stats.ratio_estimate(sums, counts, weights, level=0.9)
    # the same draws, done the long way: resample whole clusters, pool their values
    idx = np.random.default_rng(4).integers(0, 7, size=(300, 7))
    by = {c: [v for v, cc in zip(values, clusters, strict=True) if cc == c] for c in
          dict.fromkeys(clusters)}
    names = list(by)
    draws = [np.mean([v for j in row for v in by[names[j]]]) for row in idx]
    lo, hi = np.percentile(draws, [5, 95])
    assert est.value == pytest.approx(np.mean(values))
    assert (est.lo, est.hi) == pytest.approx((lo, hi))


def test_constant_effects_have_a_zero_width_interval_and_null_band():
    est = stats.paired_difference([1] * 6, [0] * 6, list("aabbcc"), n_boot=100)
    assert est.value == est.lo == est.hi == 1.0
    band = stats.null_band([0.1, -0.2, None, 0.05])
    assert band == (-0.2, 0.1)
    assert stats.beyond_band(-0.3, band, "away") and not stats.beyond_band(0.3, band, "away")
    assert stats.beyond_band(0.3, band, "toward") and not stats.beyond_band(0.0, band, "toward")


def test_pick_strength():
    from latentaudit.steer.search import pick_strength

    assert pick_strength({0.5: 0.0, 1.0: 0.05, 2.0: 0.5}, 0.1) == 1.0
    assert pick_strength({0.5: 0.3, 1.0: 0.6}, 0.1) == 0.5
    assert pick_strength({0.5: None, 1.0: 0.0}, 0.1) == 1.0


def test_config_is_checked():
    with pytest.raises(LatentAuditError, match="--methods"):
        SteerConfig(methods=("attribution", "nope"))
    with pytest.raises(LatentAuditError, match="--strengths"):
        SteerConfig(strengths=(0.0,))
    c = Condition("attribution", (3,), "away", 0.5, -2.0)
    assert c.key == "3/away/0.5" and c.id == "attribution/3/away/0.5" and c.base_id == "base"


# ---- the sweep end to end --------------------------------------------------------------------

D_SAE = 24
SWEEP_PROMPTS = [{"prompt_id": f"q{i}", "prompt": f"Is claim {i} true, right?",
                  "fact": f"Claim {i} is false.", "meta": {"claim": f"claim {i}"}}
                 for i in range(6)]


@pytest.fixture()
def run_dir(tmp_path, tiny_model_dir):
    """A hand-made attribution run on the tiny model: manifest, Δ vectors, ranking, dataset."""
    from safetensors.torch import save_file

    sae = random_sae(32, D_SAE, layer=LAYER)
    sae.save(tmp_path / "sae")
    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({"delta_attribution": torch.randn(D_SAE, generator=g),
               "delta_activation": torch.randn(D_SAE, generator=g)},
              run / "attribution.safetensors")
    data = tmp_path / "dataset.jsonl"
    data.write_text("".join(json.dumps({"prompt_id": pid, "prompt": "x", "completion": c,
                                        "label": lab}) + "\n"
                            for pid in ("q0", "q1") for c, lab in (("Yes", "positive"),
                                                                   ("No", "negative"))))
    (run / "manifest.json").write_text(json.dumps({
        "model": {"name": str(tiny_model_dir)}, "layers": [LAYER],
        "saes": {str(LAYER): {"path": str(tmp_path / "sae")}},
        "dataset": {"path": str(data)}}))
    (run / "ranking.jsonl").write_text("".join(json.dumps({"layer": LAYER, "latent": i,
                                                           "rank": r + 1}) + "\n"
                                               for r, i in enumerate([5, 7, 9])))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in SWEEP_PROMPTS))
    # a rules judge that decides every byte string: a letter a-m validates, else it corrects
    (tmp_path / "rules.json").write_text(json.dumps({"rubric": "false-belief", "questions": {
        "validation": {"rules": [{"answer": "VALIDATES", "patterns": ["[a-m]"]}],
                       "default": "CORRECTS"},
        "coherent": {"rules": [{"answer": 0, "patterns": ["(.)\\1\\1"]}], "default": 100}}}))
    return run


def sweep_args(run: Path, *extra: str) -> list[str]:
    return ["steer", "--from", str(run), "--prompts", str(run.parent / "prompts.jsonl"),
            "--judge", f"rules:{run.parent / 'rules.json'}", "--coherence-judge",
            f"rules:{run.parent / 'rules.json'}",
            "--top-k", "2", "--n", "2", "--strengths", "2,8", "--max-new-tokens", "6",
            "--batch-size", "5", "--n-boot", "200", "--logodds-top", "3", "--device", "cpu",
            *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_sweep_writes_rates_that_recompute_from_its_completions(run_dir, capsys):
    assert main(sweep_args(run_dir)) == 0
    rows = lines(run_dir / "steering.jsonl")
    # 3 methods x 2 latents x 2 directions x 2 strengths
    assert len(rows) == 24
    assert {r["method"] for r in rows} == {"attribution", "activation", "random"}
    manifest = json.loads((run_dir / "steer" / "manifest.json").read_text())
    assert manifest["prompt_ids"] == ["q2", "q3", "q4", "q5"]  # q0, q1 were used by attribution
    gen = lines(run_dir / "steer" / "completions.jsonl")
    judged = {(g["key"], g["prompt_id"], g["sample_index"]): g
              for g in lines(run_dir / "steer" / "judged.jsonl")}
    keys = {g["key"] for g in gen}
    assert "base" in keys and len(gen) == len(keys) * 8
    # recompute one row's paired difference from the judged completions
    r = rows[0]
    key = f"{r['latents'][0]}/{r['direction']}/{r['strength']:g}"
    val = {"positive": 1, "negative": 0}
    pairs = [(val.get(judged[(key, p, i)]["outcome"]), val.get(judged[("base", p, i)]["outcome"]))
             for p in manifest["prompt_ids"] for i in range(2)]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    assert r["n_paired"] == len(pairs)
    assert len(pairs) > 4 and r["diff"] == pytest.approx(sum(a - b for a, b in pairs) / len(pairs))
    assert any(x["diff"] for x in rows) and any(x["incoherence"] for x in rows)
    # the same seeds as the baseline: the toward/away rows differ from it only by steering
    base = {(g["prompt_id"], g["sample_index"]): g for g in gen if g["key"] == "base"}
    assert len(base) == 8
    lo = lines(run_dir / "steering_logodds.jsonl")
    assert {tuple(x["latents"]) for x in lo} >= {(5,), (7,), (9,)}
    summary = json.loads((run_dir / "steering_summary.json").read_text())
    assert summary["resid_norm"] > 0 and len(summary["summary"]) == 12
    out = capsys.readouterr().out
    assert "attribution" in out and "steering.jsonl" in out
    pytest.importorskip("matplotlib")
    assert (run_dir / "steering_away.png").stat().st_size > 1000
    assert (run_dir / "steering_toward.svg").is_file()
    assert (run_dir / "steering_away_sorted.png").stat().st_size > 1000


def test_a_killed_sweep_resumes_without_redoing_finished_rows(run_dir, monkeypatch):
    import latentaudit.steer.generation as G

    assert main(sweep_args(run_dir, "--methods", "attribution", "--no-logodds")) == 0
    path = run_dir / "steer" / "completions.jsonl"
    full = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(full[:len(full) // 2]) + full[len(full) // 2][:20])  # torn line
    made = []
    real = G.generate_rows

    def counting(loaded, layer, todo, *a, **k):
        made.extend(todo)
        return real(loaded, layer, todo, *a, **k)

    monkeypatch.setattr(G, "generate_rows", counting)
    assert main(sweep_args(run_dir, "--methods", "attribution", "--no-logodds")) == 0
    assert len(made) == len(full) - len(full) // 2
    again = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert sorted(again) == sorted(full)  # the same rows, token for token


def test_other_sampling_settings_are_refused_before_the_model_loads(run_dir, monkeypatch):
    assert main(sweep_args(run_dir, "--methods", "random", "--directions", "away",
                           "--no-logodds")) == 0
    import latentaudit.models.load as L

    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(LatentAuditError, match="temperature"):
        from latentaudit.steer import SteerConfig, plan_steering

        plan_steering(SteerConfig(temperature=0.5), run=run_dir,
                      prompts=run_dir.parent / "prompts.jsonl", judge="rules",
                      coherence_judge=f"rules:{run_dir.parent / 'rules.json'}")
    assert main(["steer", "--from", str(run_dir / "nope")]) == 2


def test_strength_search_keeps_one_strength_per_latent(run_dir):
    assert main(sweep_args(run_dir, "--methods", "attribution,random", "--search",
                           "--search-n", "4", "--max-incoherence", "0.1", "--no-logodds")) == 0
    rows = lines(run_dir / "steering.jsonl")
    assert len(rows) == 2 * 2 * 2 and all(r["searched"] for r in rows)
    assert all(r["strength"] in (2.0, 8.0) for r in rows)


def test_model_diff_activation_equals_a_direct_computation(loaded):
    from latentaudit.steer.diff import mean_completion_activation

    sae = random_sae(32, D_SAE, layer=0)
    tok = loaded.tokenizer
    seqs = [(tok("Q: hi")["input_ids"], tok("yes it is")["input_ids"]),
            (tok("Q: a longer prompt")["input_ids"], tok("no")["input_ids"])]
    got = mean_completion_activation(loaded, sae, 0, seqs, batch_size=2)
    feats = []
    with torch.no_grad():  # hidden_states[1]: layer 0's output (the last entry is normed)
        for p, q in seqs:
            hs = loaded.model(input_ids=torch.tensor([p + q]), output_hidden_states=True)
            feats.append(sae.encode(hs.hidden_states[1][0, len(p):]))
    want = torch.cat(feats).mean(0)
    assert torch.allclose(got, want, atol=1e-5)


def test_sweep_with_a_model_diff_and_a_toward_model(run_dir, tmp_path):
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)
    assert main(sweep_args(run_dir, "--methods", "model-diff,random", "--base-model", str(other),
                           "--toward-model", str(other), "--strengths", "4")) == 0
    rows = lines(run_dir / "steering.jsonl")
    assert {r["method"] for r in rows} == {"model-diff", "random"}
    assert {r["model"] for r in rows if r["direction"] == "toward"} == {"toward"}
    gen = lines(run_dir / "steer" / "completions.jsonl")
    assert {"base", "base@toward"} <= {g["key"] for g in gen}
    from safetensors.torch import load_file

    diff = load_file(run_dir / "steer" / "model_diff.safetensors")
    top = diff["model_diff"].argsort(descending=True)[:2].tolist()
    # Δ_model by hand: each model's mean SAE activation over the dataset's completion tokens
    from latentaudit.attribution.plan import encode_completions
    from latentaudit.data.behaviour import load_behaviour
    from latentaudit.saes import load_sae

    sae = load_sae(run_dir.parent / "sae")
    means = []
    for name in (json.loads((run_dir / "manifest.json").read_text())["model"]["name"], other):
        m = load_model(str(name), device="cpu")
        feats, out = [], {}
        hook = layer_list(m.model)[LAYER].register_forward_hook(  # the layer's own output
            lambda mod, args, o, out=out: out.update(h=o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            for p, q in encode_completions(m.tokenizer, load_behaviour(
                    run_dir.parent / "dataset.jsonl"), None):
                m.model(input_ids=torch.tensor([p + q]))
                feats.append(sae.encode(out["h"][0, len(p):]))
        hook.remove()
        means.append(torch.cat(feats).mean(0))
    assert torch.allclose(diff["model_diff"], means[0] - means[1], atol=1e-5)
    assert sorted({r["latents"][0] for r in rows if r["method"] == "model-diff"}) == sorted(top)
    # the unsteered toward rows are the other model's own samples (same seeds as `sample`)
    sampled = tmp_path / "other.jsonl"
    assert main(["sample", "--model", str(other), "--prompts", str(run_dir.parent /
                 "prompts.jsonl"), "--n", "2", "--max-new-tokens", "6", "--top-p", "0.9",
                 "--seed", "0", "--device", "cpu", "--out", str(sampled)]) == 0
    want = {(r["prompt_id"], r["sample_index"]): r["completion"] for r in lines(sampled)}
    toward = {(g["prompt_id"], g["sample_index"]): g["completion"] for g in gen
              if g["key"] == "base@toward"}
    main_rows = {(g["prompt_id"], g["sample_index"]): g["completion"] for g in gen
                 if g["key"] == "base"}
    assert toward and all(want[k] == v for k, v in toward.items())
    assert any(main_rows[k] != v for k, v in toward.items())


def test_logodds_only_samples_nothing(run_dir, capsys):
    assert main(sweep_args(run_dir, "--logodds-only")) == 0
    assert not (run_dir / "steer" / "completions.jsonl").exists()
    rows = lines(run_dir / "steering_logodds.jsonl")
    # 2 latents x 3 methods + the 3 ranking latents (some may coincide), x 2 directions x 2
    assert len({(tuple(r["latents"]), r["direction"], r["strength"]) for r in rows}) == len(rows)
    assert {5, 7, 9} <= {r["latents"][0] for r in rows}
    assert "mean Δlog-odds" in capsys.readouterr().out


@pytest.mark.parametrize("layer", [0, 1])
def test_log_odds_of_the_upper_layers_equal_full_forwards(loaded, layer):
    from latentaudit.steer.logodds import log_odds_grid

    ids = prompts(loaded.tokenizer)
    sig = Signature((10, 20, 30), (40, 50), ())
    vecs = vectors(5, loaded.d_model, 3.0, seed=2)
    vecs[0] = 0
    grid = log_odds_grid(loaded, layer, ids, vecs, sig, batch_size=2)  # (C, P)
    rows = log_odds_rows(loaded, layer, ids, vecs.repeat(4, 1),
                         torch.arange(4).repeat_interleave(5), sig, 3).view(4, 5).T
    assert grid.shape == (5, 4)
    assert torch.allclose(grid, rows, atol=1e-4)
    assert not torch.allclose(grid[1], grid[0], atol=1e-3)  # steering moved them


def test_a_smaller_prompt_set_reuses_the_rows_already_made(run_dir, monkeypatch):
    import latentaudit.steer.generation as G

    base = sweep_args(run_dir, "--methods", "attribution", "--directions", "away",
                      "--no-logodds")
    assert main(base) == 0
    made = []
    real = G.generate_rows
    monkeypatch.setattr(G, "generate_rows",
                        lambda loaded, layer, todo, *a, **k: made.extend(todo) or
                        real(loaded, layer, todo, *a, **k))
    assert main([*base, "--max-prompts", "2"]) == 0
    assert made == []
    rows = lines(run_dir / "steering.jsonl")
    assert all(r["n"] == 4 for r in rows)  # 2 prompts x 2 samples


def test_a_methods_mean_effect_has_a_bootstrap_interval_over_its_latents():
    est = stats.mean_estimate([0.1, 0.3, 0.2, 0.4], n_boot=500, seed=1)
    assert est.value == pytest.approx(0.25) and est.n == 4
    assert 0.1 <= est.lo < 0.25 < est.hi <= 0.4
    assert stats.mean_estimate([]).value is None


def test_sorted_effects_put_the_strongest_in_the_steered_direction_first():
    from latentaudit.steer.figures import sorted_effects

    def row(method, diff):
        return SteeringRow(method=method, latents=[1], direction="away", strength=0.5,
                           alpha=1.0, model="main", searched=False, n=4, n_decided=4,
                           rate=None, rate_ci=[None, None], base_rate=None,
                           base_rate_ci=[None, None], diff=diff, diff_ci=[None, None],
                           n_paired=4, incoherence=None, incoherence_ci=[None, None])

    rows = [row("attribution", 0.1), row("attribution", -0.3), row("random", 0.0),
            row("attribution", None), row("model-diff", -0.05)]
    assert sorted_effects(rows, "away") == {"attribution": [-0.3, 0.1],
                                            "model-diff": [-0.05], "random": [0.0]}
    assert sorted_effects(rows, "toward")["attribution"] == [0.1, -0.3]
