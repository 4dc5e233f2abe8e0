"""The explain stage against ground truth: the streaming top-k against one top-k over everything,
density and Spearman by hand, the per-token maps against the attribution run, the exact ablation
against a direct full forward, and the upper-layers replay against full forwards."""

from __future__ import annotations

import pytest
import torch

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.attribution.output import write_run
from latentaudit.errors import LatentAuditError
from latentaudit.explain import ExplainConfig, explain_latents
from latentaudit.explain.exact import ablate, average_ranks, exact_changes, exact_check, spearman
from latentaudit.explain.maps import pair_weights, sample_pairs, token_map
from latentaudit.explain.output import final_order
from latentaudit.explain.topk import (
    HIST_EDGES,
    empty_density,
    empty_topk,
    merge_states,
    merge_topk,
    ordered_topk,
    update_density,
)
from latentaudit.models.hooks import layer_list, resid_hooks
from latentaudit.models.lens import promoted_suppressed, through_norm
from latentaudit.models.upper import final_norm
from test_attribute import ablated_loss, loaded, make_data, reference_delta
from tiny import random_sae

# -- the streaming top-k ------------------------------------------------------------------------


def _batch(seed=0, B=7, T=11, S=6):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(B, T, S, generator=g))  # ~half zeros, distinct positives
    ids = torch.randint(0, 500, (B, T), generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    return acts, ids, valid


@pytest.mark.parametrize("split", [[7], [1] * 7, [3, 4], [2, 2, 3], [5, 2]])
def test_streamed_topk_equals_all_at_once(split):
    acts, ids, valid = _batch()
    seq = torch.arange(7) + 100
    whole = merge_topk(empty_topk(6, 5, 3, 2), acts, ids, valid, seq, 3, 2)
    state, s = empty_topk(6, 5, 3, 2), 0
    for n in split:
        state = merge_topk(state, acts[s:s + n], ids[s:s + n], valid[s:s + n], seq[s:s + n], 3, 2)
        s += n
    for name, a, b in zip(whole._fields, whole, state, strict=True):
        assert torch.equal(a, b), name


def _tied_batch(seed=0, B=9, T=8, S=5):
    """Activations drawn from a handful of values, so most of them tie."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, 4, (B, T, S), generator=g).float() * 0.5  # 0, 0.5, 1, 1.5
    ids = torch.randint(0, 500, (B, T), generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    return acts, ids, valid


def test_ordered_topk_keeps_the_first_of_equal_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (40, 17), generator=g).float()
    x[3] = float("-inf")
    x[4, :5] = float("-inf")
    for k in (1, 4, 17):
        values, index = ordered_topk(x, k)
        for r in range(len(x)):
            ref = sorted(range(x.shape[1]), key=lambda c: (-x[r, c].item(), c))[:k]
            assert values[r].tolist() == [x[r, c].item() for c in ref]
            if torch.isfinite(x[r]).all():
                assert index[r].tolist() == ref


@pytest.mark.parametrize("split", [[9], [1] * 9, [4, 5], [2, 3, 4], [8, 1]])
def test_streamed_topk_with_ties_equals_all_at_once_and_the_first_place_wins(split):
    acts, ids, valid = _tied_batch()
    B, T, S = acts.shape
    seq = torch.arange(B)
    whole = merge_topk(empty_topk(S, 6, 1, 1), acts, ids, valid, seq, 1, 1)
    state, parts, s = empty_topk(S, 6, 1, 1), [], 0
    for n in split:
        rows = slice(s, s + n)
        state = merge_topk(state, acts[rows], ids[rows], valid[rows], seq[rows], 1, 1)
        parts.append(merge_topk(empty_topk(S, 6, 1, 1), acts[rows], ids[rows], valid[rows],
                                seq[rows], 1, 1))
        s += n
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_states(merged, part)
    for name, a, b, c in zip(whole._fields, whole, state, merged, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), name
    for i in range(S):  # by hand: value down, then the earliest (sequence, position)
        cands = sorted((-acts[b, t, i].item(), b, t) for b in range(B) for t in range(T)
                        if valid[b, t] and acts[b, t, i] > 0)[:6]
        got = list(zip(whole.sequence[i].tolist(), whole.position[i].tolist(), strict=True))
        assert got[:len(cands)] == [(b, t) for _, b, t in cands]


def test_topk_by_hand_against_a_sort_of_everything():
    acts, ids, valid = _batch(seed=3)
    B, T, S = acts.shape
    top = merge_topk(empty_topk(S, 4, 2, 1), acts, ids, valid, torch.arange(B), 2, 1)
    for i in range(S):
        cands = sorted(((acts[b, t, i].item(), b, t) for b in range(B) for t in range(T)
                        if valid[b, t] and acts[b, t, i] > 0), reverse=True)[:4]
        assert top.values[i, :len(cands)].tolist() == pytest.approx([c[0] for c in cands])
        for j, (_, b, t) in enumerate(cands):
            assert (top.sequence[i, j], top.position[i, j]) == (b, t)
            window = [ids[b, p].item() if 0 <= p < T else -1 for p in range(t - 2, t + 2)]
            assert top.window_ids[i, j].tolist() == window
            vals = [acts[b, p, i].item() if 0 <= p < T else 0.0 for p in range(t - 2, t + 2)]
            assert top.window_acts[i, j].tolist() == pytest.approx(vals)
        assert (top.sequence[i, len(cands):] == -1).all()


def test_topk_ignores_zero_and_invalid_positions():
    acts = torch.zeros(1, 4, 2)
    acts[0, 0, 0] = 9.0  # invalid position
    acts[0, 2, 0] = 1.5
    valid = torch.tensor([[False, True, True, True]])
    top = merge_topk(empty_topk(2, 3, 1, 1), acts, torch.arange(4)[None], valid,
                     torch.tensor([0]), 1, 1)
    assert top.values[0].tolist() == [1.5, float("-inf"), float("-inf")]
    assert top.sequence.tolist() == [[0, -1, -1], [-1, -1, -1]]
    assert top.window_ids[0, 0].tolist() == [1, 2, 3]


def test_density_by_hand():
    acts = torch.tensor([[0.0, 2e-3, 5.0], [1e-5, 0.0, 5e3], [0.5, 0.0, 0.0]])
    d = update_density(empty_density(3), acts)
    assert d.fired.tolist() == [2, 1, 2]
    bins = len(HIST_EDGES) - 1
    expect = torch.zeros(3, bins, dtype=torch.long)
    expect[0, 0] += 1  # 1e-5: below the first edge, counted in bin 0
    expect[0, int((torch.log10(torch.tensor(0.5)) + 3) / 0.2)] += 1
    expect[1, int((torch.log10(torch.tensor(2e-3)) + 3) / 0.2)] += 1
    expect[2, int((torch.log10(torch.tensor(5.0)) + 3) / 0.2)] += 1
    expect[2, bins - 1] += 1  # 5e3: above the last edge
    assert torch.equal(d.histogram, expect)
    again = update_density(d, acts)
    assert torch.equal(again.histogram, 2 * expect)


# -- small pure functions -----------------------------------------------------------------------

def test_spearman_by_hand():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == \
        pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    # x ranks 1,2,3,4,5; y = [5, 6, 7, 8, 7] ranks 1,2,3.5,5,3.5: d = 0,0,-.5,-1,1.5
    # Pearson of ranks: cov = Σ (rx−3)(ry−3) = (−2)(−2)+(−1)(−1)+0+(1)(2)+(2)(.5) = 8;
    # |rx−3|² = 10, |ry−3|² = 4+1+.25+4+.25 = 9.5 → ρ = 8 / sqrt(95)
    rho = spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7]))
    assert rho == pytest.approx(8 / 95 ** 0.5)
    assert average_ranks(torch.tensor([3.0, 1, 3, 2])).tolist() == [3.5, 1, 3.5, 2]
    assert spearman(torch.tensor([1.0, 1]), torch.tensor([1.0, 2])) != spearman(
        torch.tensor([1.0, 1]), torch.tensor([1.0, 2]))  # nan for a constant input


def test_ablate_by_hand():
    h = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    a_bar = torch.tensor([1.0, 0.0])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = ablate(h, a_bar, d, torch.tensor([True, False]))
    assert out.tolist() == [[[1.0, 4.0], [1.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]


def test_pair_sampling_and_weights():
    pairs = [(0, 3), (1, 3), (2, 4), (0, 4)]
    assert sorted(sample_pairs(pairs, 0, 7)) == sorted(pairs)
    assert sample_pairs(pairs, 2, 7) == sample_pairs(pairs, 0, 7)[:2]
    assert pair_weights(pairs) == {0: 0.5, 1: 0.25, 2: 0.25, 3: -0.5, 4: -0.5}


def test_map_summary_by_hand():
    from latentaudit.explain.maps import CompletionMap, map_summary

    pos = CompletionMap([1, 2, 3], 1, 0.0, {0: torch.tensor([[5.0], [1.0], [2.0]])})
    neg = CompletionMap([1, 2], 1, 0.0, {0: torch.tensor([[0.0], [-1.0]])})
    got = map_summary([pos, neg], [True, False], 0, 0, [["a", "b", "c"], ["a", "b"]], [7, 9], 1)
    assert got == {"mean_positive": 8.0, "mean_negative": -1.0,  # prompt position 0 not listed
                   "top_tokens": [{"completion": 0, "line": 7, "position": 2, "token": "c",
                                   "delta": 2.0}]}


def test_final_order_rescores_only_the_top():
    assert final_order([5, 6, 7, 8], {5: 0.1, 6: 0.3, 7: 0.2}, 3) == [6, 7, 5, 8]
    assert final_order([5, 6, 7, 8], {}, 0) == [5, 6, 7, 8]


def test_exact_check_by_hand():
    change = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    first = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    check = exact_check(change, first, [(0, 1)])
    assert check.exact_delta.tolist() == [1.0, 1.5, 3.0]
    assert check.first_order_delta.tolist() == [1.0, 3.0, 2.0]
    assert check.rho == pytest.approx(0.5)
    assert check.rho_per_completion[0] == pytest.approx(0.5)


def test_promoted_and_suppressed_by_hand():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [0.5, 0.5]])
    ps = promoted_suppressed(torch.tensor([[1.0, 0.0]]), W, k=2)
    assert ps.promoted_ids.tolist() == [[0, 3]] and ps.promoted.tolist() == [[1.0, 0.5]]
    assert ps.suppressed_ids.tolist() == [[2, 1]] and ps.suppressed.tolist() == [[-2.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lens_in_chunks_equals_the_whole_computation(monkeypatch, dtype):
    from latentaudit.models import lens

    W = torch.randn(500, 16).to(dtype)
    d = torch.randn(37, 16)
    Wf = W.float()
    cos = (d / d.norm(dim=1, keepdim=True)) @ (Wf / Wf.norm(dim=1, keepdim=True)).T  # (37, 500)
    logits = d @ Wf.T
    monkeypatch.setattr(lens, "CHUNK_BYTES", 4 * 16 * 7)  # 7 directions, 7 vocabulary rows
    got = lens.logit_lens(d, W, k=5)
    torch.testing.assert_close(got.cosines, cos.topk(5, dim=1).values)
    assert got.token_ids.tolist() == cos.topk(5, dim=1).indices.tolist()
    ps = lens.promoted_suppressed(d, W, k=3)
    torch.testing.assert_close(ps.promoted, logits.topk(3, dim=1).values)
    torch.testing.assert_close(ps.suppressed, logits.topk(3, dim=1, largest=False).values)
    assert ps.suppressed_ids.tolist() == logits.topk(3, dim=1, largest=False).indices.tolist()


def test_logprob_shift_in_chunks_by_hand(monkeypatch):
    from latentaudit.explain import effect

    clean, edited = torch.randn(9, 11), torch.randn(3, 9, 11)
    want = (edited.double().log_softmax(-1) - clean.double().log_softmax(-1)).sum(1)  # (3, 11)
    monkeypatch.setattr(effect, "SHIFT_BYTES", 8 * 11 * 2)  # 2 positions at a time
    torch.testing.assert_close(effect.logprob_shift(clean, edited), want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_final_norm_as_a_linear_map(arch):
    lm = loaded(arch, dtype=torch.float32, layers=2)
    norm = final_norm(lm.model)
    d = torch.randn(3, 32)
    got = through_norm(d, norm)
    if arch == "llama":  # RMSNorm: γ ⊙ d / rms(d)
        rms = d.pow(2).mean(1, keepdim=True).add(norm.variance_epsilon).sqrt()
        want = norm.weight * d / rms
    else:  # LayerNorm without its bias
        c = d - d.mean(1, keepdim=True)
        want = norm.weight * c / (c.pow(2).mean(1, keepdim=True) + norm.eps).sqrt()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_map_sums_to_the_completion_delta():
    lm = loaded()
    sae = random_sae(32, 12, layer=1).double()
    comp = make_data()[0]
    delta, _ = reference_delta(lm, comp, 1, sae, sae.mean_activation)
    from latentaudit.attribution.plan import encode_completions
    from latentaudit.explain.maps import completion_maps

    seqs = encode_completions(lm.tokenizer, [comp], None)
    dirs = sae.decoder_directions(torch.float64)
    maps = completion_maps(lm, seqs, {1: dirs}, {1: sae.mean_activation}, "all", 1, 258)
    torch.testing.assert_close(maps[0].deltas[1].double().sum(0), delta.float().double(),
                               rtol=1e-4, atol=1e-7)
    assert token_map(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2), torch.eye(2),
                     torch.tensor([True, False])).tolist() == [[-1.0, -1.0], [0.0, 0.0]]


# -- exact ablation -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_ablation_equals_a_direct_full_forward(arch):
    lm = loaded(arch)
    sae = random_sae(32, 6, layer=0).double()
    comps = make_data()[:2]
    from latentaudit.attribution.plan import encode_completions

    seqs = encode_completions(lm.tokenizer, comps, None)
    dirs = sae.decoder_directions(torch.float64)
    got = exact_changes(lm.model, 0, seqs, dirs, sae.mean_activation, "all", batch=4)
    assert got.route == "upper-layers"
    for c, comp in enumerate(comps):
        base = ablated_loss(lm, comp, 0, dirs[0], sae.mean_activation, eps=0.0)
        assert got.clean[c].item() == pytest.approx(base, rel=1e-9)
        for i in range(6):
            direct = ablated_loss(lm, comp, 0, dirs[i], sae.mean_activation) - base
            # Llama's RMSNorm computes in float32 whatever the model dtype: that noise floor
            assert got.change[c, i].item() == pytest.approx(direct, rel=1e-7, abs=1e-10)


def _direct_completion_ablation(lm, seq, layer, direction, a_bar):
    """Loss change when only the completion's positions are ablated (full forward)."""
    p, q = seq
    ids = torch.tensor([p + q])

    def hook(h):
        proj = ((h - a_bar) @ direction) * (torch.arange(h.shape[1]) >= len(p))
        return h - proj[..., None] * direction

    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
        with resid_hooks(lm.model, {layer: hook}):
            abl = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
    ce = torch.nn.functional.cross_entropy
    return (ce(abl, torch.tensor(q)) - ce(clean, torch.tensor(q))).item()


def test_exact_ablation_of_completion_positions_only():
    lm = loaded()
    sae = random_sae(32, 4, layer=1).double()
    from latentaudit.attribution.plan import encode_completions

    seqs = encode_completions(lm.tokenizer, make_data()[2:3], None)
    dirs = sae.decoder_directions(torch.float64)
    got = exact_changes(lm.model, 1, seqs, dirs, sae.mean_activation, "completion")
    for i in range(4):
        want = _direct_completion_ablation(lm, seqs[0], 1, dirs[i], sae.mean_activation)
        assert got.change[0, i].item() == pytest.approx(want, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_upper_layers_route_equals_full_forwards(arch):
    lm = loaded(arch, layers=3)
    sae = random_sae(32, 9, seed=4).double()
    from latentaudit.attribution.plan import encode_completions

    seqs = encode_completions(lm.tokenizer, make_data()[:3], None)
    dirs = sae.decoder_directions(torch.float64)
    for layer in range(len(layer_list(lm.model))):
        up = exact_changes(lm.model, layer, seqs, dirs, sae.mean_activation, "all", batch=4)
        full = exact_changes(lm.model, layer, seqs, dirs, sae.mean_activation, "all", batch=4,
                             route="full-forward")
        assert up.route == "upper-layers" and full.route == "full-forward"
        torch.testing.assert_close(up.change, full.change, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(up.clean, full.clean)


def test_a_model_whose_replay_fails_falls_back_to_full_forwards(monkeypatch):
    import latentaudit.explain.exact as exact

    lm = loaded()
    sae = random_sae(32, 3, layer=0).double()
    from latentaudit.attribution.plan import encode_completions

    seqs = encode_completions(lm.tokenizer, make_data()[:1], None)
    dirs = sae.decoder_directions(torch.float64)
    want = exact_changes(lm.model, 0, seqs, dirs, sae.mean_activation, "all")
    monkeypatch.setattr(exact, "upper_logits", lambda *a, **k: 2 * torch.ones(1))
    monkeypatch.setattr("latentaudit.models.upper.upper_logits", lambda *a, **k: torch.ones(1))
    got = exact_changes(lm.model, 0, seqs, dirs, sae.mean_activation, "all")
    assert got.route == "full-forward"
    torch.testing.assert_close(got.change, want.change)


# -- the driver on a tiny run -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model, a saved SAE, a behaviour file and an attribution run of them."""
    import json

    root = tmp_path_factory.mktemp("explain")
    lm = loaded(dtype=torch.float64)
    sae = random_sae(32, 40, layer=1).double()
    sae_dir = sae.save(root / "sae")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": c.prompt, "completion": c.completion,
                                        "label": c.label, "prompt_id": c.prompt_id}) + "\n"
                            for c in make_data()))
    from latentaudit.saes import load_sae

    result = attribute(lm, load_sae(sae_dir, dtype="fp32").double(), data,
                       AttributionConfig(batch_size=4, top_k=30))
    write_run(root / "run", result)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the sky is blue and water "
                                                  f"boils at {i} degrees. " * 3}) + "\n"
                              for i in range(12)))
    return lm, root, corpus


def small_cfg(corpus, **kw) -> ExplainConfig:
    opts = dict(corpus=str(corpus), corpus_tokens=600, context_len=32, top_k=6, examples=5,
                exact_pairs=2, map_pairs=0, batch_size=3)
    opts.update(kw)
    return ExplainConfig(**opts)


def test_maps_over_every_pair_reproduce_the_run(tiny_run, tmp_path):
    lm, root, corpus = tiny_run
    res = explain_latents(root / "run", None, small_cfg(corpus), model=lm, out=tmp_path / "x",
                          cache_dir=tmp_path)
    from safetensors.torch import load_file

    run_delta = load_file(root / "run" / "attribution.safetensors")["delta_attribution"]
    maps = res.token_maps
    w = torch.tensor([c["weight"] for c in res.completions], dtype=torch.float64)
    per_completion = torch.stack([maps["token_delta"][a:b].double().sum(0) for a, b in
                                  zip(maps["offsets"][:-1], maps["offsets"][1:], strict=True)])
    got = w @ per_completion  # Σ_C w_C Σ_t δ_{i,t}
    torch.testing.assert_close(got, run_delta[maps["latents"]].double(), rtol=1e-4, atol=1e-7)
    deltas = torch.tensor([c["delta"] for c in res.completions], dtype=torch.float64)
    torch.testing.assert_close(deltas, per_completion, rtol=1e-5, atol=1e-8)
    assert [r["rank"] for r in res.latents] == [1, 2, 3, 4, 5, 6]


def test_second_run_reads_the_cache_without_the_model_pass(tiny_run, tmp_path, monkeypatch):
    import latentaudit.explain.examples as examples

    lm, root, corpus = tiny_run
    cfg = small_cfg(corpus, exact_pairs=0, maps=False)
    first = explain_latents(root / "run", [3, 7], cfg, model=lm, out=tmp_path / "a",
                            cache_dir=tmp_path)
    monkeypatch.setattr(examples, "merge_batch", lambda *a, **k: pytest.fail("model ran"))
    again = explain_latents(root / "run", [3, 7], cfg, model=lm, out=tmp_path / "b",
                            cache_dir=tmp_path)
    assert [r["top_examples"] for r in again.latents] == [r["top_examples"] for r in first.latents]
    assert first.exact == {} and first.token_maps == {}


def test_killed_corpus_pass_resumes_to_the_same_state(tiny_run, tmp_path, monkeypatch):
    import latentaudit.explain.examples as examples

    lm, root, corpus = tiny_run
    cfg = small_cfg(corpus)
    sae = random_sae(32, 40, layer=1).double()
    full = examples.corpus_examples(lm, sae, 1, cfg, "k1", tmp_path / "full")
    real, calls = examples.merge_batch, []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(examples, "merge_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        examples.corpus_examples(lm, sae, 1, cfg, "k1", tmp_path, checkpoint_seconds=1e-9)
    monkeypatch.setattr(examples, "merge_batch", real)
    resumed = examples.corpus_examples(lm, sae, 1, cfg, "k1", tmp_path)
    assert resumed.sequences == full.sequences == examples.n_sequences(cfg)
    for a, b in zip(full.top + full.density, resumed.top + resumed.density, strict=True):
        torch.testing.assert_close(a, b)
    assert resumed.tokens == full.tokens == examples.n_sequences(cfg) * (32 - 1)


def test_top_example_windows_show_the_activating_token(tiny_run, tmp_path):
    lm, root, corpus = tiny_run
    res = explain_latents(root / "run", None, small_cfg(corpus, exact_pairs=0), model=lm,
                          out=tmp_path / "x", cache_dir=tmp_path)
    row = next(r for r in res.latents if r["top_examples"])
    ex = row["top_examples"][0]
    assert ex["activations"][ex["max_index"]] == pytest.approx(ex["activation"])
    acts = [e["activation"] for e in row["top_examples"]]
    assert acts == sorted(acts, reverse=True)
    assert len(ex["tokens"]) == len(ex["token_ids"]) == len(ex["activations"])


def test_rescore_orders_the_top_by_the_exact_effect(tiny_run, tmp_path):
    lm, root, corpus = tiny_run
    res = explain_latents(root / "run", None, small_cfg(corpus, rescore=10, exact_pairs=3,
                                                        top_k=10), model=lm,
                          out=tmp_path / "x", cache_dir=tmp_path)
    exact = [r["exact_delta"] for r in res.latents]
    assert exact == sorted(exact, reverse=True)
    assert [r["final_rank"] for r in res.latents] == list(range(1, 11))
    assert sorted(r["rank"] for r in res.latents) == list(range(1, 11))
    layer = res.exact["layers"]["1"]
    assert len(layer["pairs"]) == 3 and layer["route"] == "upper-layers"
    assert -1.0 <= layer["spearman"] <= 1.0


def test_exact_top_measures_more_latents_without_reranking(tiny_run, tmp_path):
    lm, root, corpus = tiny_run
    cfg = dict(exact_pairs=2, effect_texts=0, maps=False)
    res = explain_latents(root / "run", None, small_cfg(corpus, top_k=3, exact_top=8, **cfg),
                          model=lm, out=tmp_path / "x", cache_dir=tmp_path)
    wide = explain_latents(root / "run", None, small_cfg(corpus, top_k=8, **cfg), model=lm,
                           out=tmp_path / "y", cache_dir=tmp_path)
    assert [r["rank"] for r in res.latents] == [r["final_rank"] for r in res.latents] == [1, 2, 3]
    got, want = res.exact["layers"]["1"], wide.exact["layers"]["1"]
    assert got["latents"] == want["latents"] == [r["latent"] for r in wide.latents]
    assert got["exact_delta"] == want["exact_delta"] and got["spearman"] == want["spearman"]
    with pytest.raises(LatentAuditError, match="--exact-top needs"):
        ExplainConfig(exact_top=5, exact_pairs=0)


def test_bad_inputs_fail_before_the_model_loads(tiny_run, tmp_path, monkeypatch):
    import latentaudit.models.load as model_load

    lm, root, corpus = tiny_run
    monkeypatch.setattr(model_load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cases = [
        (dict(run=tmp_path / "nope"), "no such run folder"),
        (dict(latents=[40]), "out of range"),
        (dict(cfg=small_cfg(tmp_path / "missing.txt")), "no such file"),
        (dict(data=tmp_path / "missing.jsonl"), "--data .*: no such file"),
        (dict(layer=3, latents=[1]), "--layer 3 is not a layer"),
    ]
    for kw, match in cases:
        args = dict(run=root / "run", latents=None, cfg=small_cfg(corpus))
        args.update(kw)
        with pytest.raises(LatentAuditError, match=match):
            explain_latents(args.pop("run"), args.pop("latents"), args.pop("cfg"),
                            cache_dir=tmp_path, **args)
    with pytest.raises(LatentAuditError, match="--rescore needs"):
        ExplainConfig(rescore=5, exact_pairs=0)


def test_a_run_of_two_layers(tiny_run, tmp_path):
    lm, root, corpus = tiny_run
    from latentaudit.saes import load_sae

    saes = {L: load_sae(random_sae(32, 24, seed=L, layer=L).save(tmp_path / f"sae{L}"),
                        dtype="fp32").double() for L in (0, 2)}
    result = attribute(lm, saes, root / "data.jsonl", AttributionConfig(batch_size=4))
    write_run(tmp_path / "run", result)
    res = explain_latents(tmp_path / "run", None, small_cfg(corpus, top_k=3), model=lm,
                          cache_dir=tmp_path)
    assert [(r["layer"], r["rank"]) for r in res.latents] == [(0, 1), (0, 2), (0, 3), (2, 1),
                                                               (2, 2), (2, 3)]
    maps, w = res.token_maps, torch.tensor([c["weight"] for c in res.completions])
    per = torch.stack([maps["token_delta"][a:b].double().sum(0) for a, b in
                       zip(maps["offsets"][:-1], maps["offsets"][1:], strict=True)])
    for col, (L, i) in enumerate(zip(maps["layers"].tolist(), maps["latents"].tolist(),
                                     strict=True)):
        want = result.layers[L].delta_attribution[i].double()
        torch.testing.assert_close(w.double() @ per[:, col], want, rtol=1e-4, atol=1e-7)
    assert set(res.exact["layers"]) == {"0", "2"}
    with pytest.raises(LatentAuditError, match="pass --layer with --latents"):
        explain_latents(tmp_path / "run", [1], small_cfg(corpus), model=lm)
    with pytest.raises(LatentAuditError, match="--sae replaces the SAE of one layer"):
        explain_latents(tmp_path / "run", None, small_cfg(corpus), model=lm,
                        sae=tmp_path / "sae0")
