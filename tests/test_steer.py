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
    sig = signature_ids(tok, {"positive": ["Yes", "That's right"], "negative": ["No", "That's a "
                                                                                     "myth"]})
    assert sig.positive == (tok("Y")["input_ids"][0],) and sig.negative == (tok("N")["input_ids"][0],)
    assert sig.dropped == (tok("T")["input_ids"][0],)
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
