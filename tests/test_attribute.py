"""Attribution against ground truth: hand-built tensors, an independent autograd route, and the
exact effect of mean-ablating a latent's projection on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.attribution.math import (
    batch_moments,
    center,
    completion_losses,
    deltas_from_moments,
    token_deltas,
)
from latentaudit.data.behaviour import Completion, make_pairs
from latentaudit.data.tokens import completion_ids, prompt_ids
from latentaudit.errors import LatentAuditError, ShapeMismatchError
from latentaudit.models.hooks import resid_hooks
from latentaudit.models.load import prepare
from tiny import random_sae, tiny_model, tiny_tokenizer

PROMPTS = ["The sky is", "Two plus two is", "Water boils at"]
COMPLETIONS = {  # prompt -> (positives, negatives)
    "The sky is": ([" green and loud."], [" blue.", " blue on a clear day"]),
    "Two plus two is": ([" five", " seven, surely"], [" four."]),
    "Water boils at": ([" 50 degrees."], [" 100 degrees Celsius at sea level."]),
}


def make_data() -> list[Completion]:
    rows = []
    for p in PROMPTS:
        pos, neg = COMPLETIONS[p]
        rows += [Completion(p, c, "positive", p) for c in pos]
        rows += [Completion(p, c, "negative", p) for c in neg]
    rows.append(Completion([{"role": "user", "content": "Hi"}], " Hello!", "positive", "chat"))
    rows.append(Completion([{"role": "user", "content": "Hi"}], " Go away.", "negative", "chat"))
    return rows


def loaded(arch="llama", dtype=torch.float64, layers=3, **kw):
    model = tiny_model(arch, dtype=dtype, layers=layers, **kw)
    return prepare(model, tiny_tokenizer(), name=f"tiny-{arch}")


def reference_delta(lm, comp: Completion, layer: int, sae, a_bar, positions="all"):
    """δ_i(C) by an independent route: inputs_embeds + output_hidden_states, full logits."""
    tok = lm.tokenizer
    p, q = prompt_ids(tok, comp.prompt), completion_ids(tok, comp.completion)
    ids = torch.tensor([p + q])
    emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = lm.model(inputs_embeds=emb, output_hidden_states=True)
    h = out.hidden_states[layer + 1]
    logits = out.logits[0, len(p) - 1:-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(q))
    (g,) = torch.autograd.grad(loss, h)
    a, g = h[0].detach(), g[0]
    if positions == "completion":
        a, g = a[len(p):], g[len(p):]
    dirs = sae.decoder_directions(torch.float64)
    return token_deltas(g, a, a_bar, dirs).sum(0), loss.item()


def ablated_loss(lm, comp: Completion, layer: int, direction, a_bar, eps=1.0):
    """ℓ_C with ε × (latent's projection − ā's projection) removed at every position."""
    tok = lm.tokenizer
    p, q = prompt_ids(tok, comp.prompt), completion_ids(tok, comp.completion)
    ids = torch.tensor([p + q])

    def ablate(h):
        proj = (h - a_bar) @ direction  # (B, T)
        return h - eps * proj[..., None] * direction

    with resid_hooks(lm.model, {layer: ablate}), torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(q)).item()


# -- pure functions on hand-built tensors -------------------------------------------------------

def test_moment_route_equals_per_token_route():
    g = torch.Generator().manual_seed(0)
    B, T, D, S = 3, 7, 16, 50
    grads, acts = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    w = torch.tensor([0.5, -0.25, -0.25])
    a_bar = torch.randn(D, generator=g)
    dirs = torch.nn.functional.normalize(torch.randn(S, D, generator=g), dim=1)
    m = batch_moments(grads, acts, w, mask)
    fast = deltas_from_moments(center(m.M_raw, m.g_sum, a_bar), dirs, chunk=7)
    slow = sum(w[b] * token_deltas(grads[b][mask[b]], acts[b][mask[b]], a_bar, dirs).sum(0)
               for b in range(B))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_token_deltas_by_hand():
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[2.0, 3.0]])
    a = torch.tensor([[5.0, 7.0]])
    a_bar = torch.tensor([1.0, 1.0])
    # δ_0 = −(2)(5−1) = −8 ; δ_1 = −(3)(7−1) = −18
    assert token_deltas(g, a, a_bar, d).tolist() == [[-8.0, -18.0]]


def test_linear_loss_is_exact():
    """Where the loss is linear in the activation, δ equals the exact mean-ablation change."""
    g = torch.Generator().manual_seed(1)
    T, D = 5, 8
    readout = torch.randn(T, D, generator=g)
    acts = torch.randn(T, D, generator=g, requires_grad=True)
    a_bar = torch.randn(D, generator=g)
    d = torch.nn.functional.normalize(torch.randn(1, D, generator=g), dim=1)
    loss = lambda a: (readout * a).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(loss(acts), acts)
    delta = token_deltas(grad, acts.detach(), a_bar, d).sum()
    a = acts.detach()
    ablated = a - ((a - a_bar) @ d[0])[:, None] * d[0]
    torch.testing.assert_close(delta, loss(ablated) - loss(a), rtol=1e-5, atol=1e-5)


def test_completion_losses_mask_and_mean():
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = 10.0
    targets = torch.tensor([[1, 2, 3], [0, 0, 0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    out = completion_losses(logits, targets, mask)
    expected0 = torch.nn.functional.cross_entropy(logits[0, :1], targets[0, :1])
    torch.testing.assert_close(out, torch.stack([expected0, torch.log(torch.tensor(4.0))]))


def test_pair_weights_by_hand_2x2():
    rows = [Completion("p", "a", "positive", "p"), Completion("p", "b", "positive", "p"),
            Completion("p", "c", "negative", "p"), Completion("p", "d", "negative", "p")]
    pairing = make_pairs(rows, "all")
    assert sorted(pairing.pairs) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert pairing.weights(4) == [0.5, 0.5, -0.5, -0.5]
    x = [1.0, 2.0, 10.0, 30.0]  # mean over pairs of x+ − x− = ((1−10)+(1−30)+(2−10)+(2−30))/4
    assert sum(w * v for w, v in zip(pairing.weights(4), x, strict=True)) == -18.5
    matched = make_pairs(rows, "matched")
    assert matched.pairs == [(0, 2), (1, 3)]
    assert matched.weights(4) == [0.5, 0.5, -0.5, -0.5]


# -- the engine against the independent route ---------------------------------------------------

@pytest.mark.slow  # the reference route is an unbatched full-logit autograd pass
@pytest.mark.parametrize("positions", ["all", "completion"])
def test_engine_matches_independent_route(positions):
    lm = loaded()
    sae = random_sae(32, 40, layer=1).double()
    data = make_data()
    cfg = AttributionConfig(batch_size=3, positions=positions, abar="sae")
    result = attribute(lm, sae, data, cfg)
    a_bar = sae.mean_activation
    pairing = make_pairs(data)
    per = [reference_delta(lm, c, 1, sae, a_bar, positions)[0] for c in data]
    expected = sum((per[p] - per[q]) for p, q in pairing.pairs) / len(pairing.pairs)
    torch.testing.assert_close(result.layers[1].delta_attribution.double(), expected,
                               rtol=1e-4, atol=1e-7)
    assert result.n_pairs == len(pairing.pairs) == 2 + 2 + 1 + 1
    assert result.n_prompts == 4


def test_delta_activation_by_hand():
    lm = loaded()
    sae = random_sae(32, 40, layer=0).double()
    data = make_data()
    result = attribute(lm, sae, data, AttributionConfig(batch_size=2))
    sums = {True: torch.zeros(40, dtype=torch.float64), False: torch.zeros(40, dtype=torch.float64)}
    counts = {True: 0, False: 0}
    for c in data:
        p, q = prompt_ids(lm.tokenizer, c.prompt), completion_ids(lm.tokenizer, c.completion)
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([p + q]), output_hidden_states=True)
        f = sae.encode(out.hidden_states[1][0, len(p):])
        sums[c.positive] += f.sum(0)
        counts[c.positive] += len(q)
    expected = sums[True] / counts[True] - sums[False] / counts[False]
    torch.testing.assert_close(result.layers[0].delta_activation.double(), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_padded_batches_equal_one_at_a_time(arch):
    lm = loaded(arch, dtype=torch.float32)
    sae = random_sae(32, 48, layer=1)
    data = make_data()
    one = attribute(lm, sae, data, AttributionConfig(batch_size=1)).layers[1]
    many = attribute(lm, sae, data, AttributionConfig(batch_size=5)).layers[1]
    scale = one.delta_attribution.abs().max()
    torch.testing.assert_close(many.delta_attribution, one.delta_attribution,
                               rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(many.delta_activation, one.delta_activation, rtol=1e-4, atol=1e-6)


def test_several_layers_in_one_pass_equal_separate_runs():
    lm = loaded(layers=4)
    saes = {0: random_sae(32, 30, seed=1).double(), 2: random_sae(32, 20, seed=2).double()}
    both = attribute(lm, saes, make_data(), AttributionConfig(batch_size=4))
    for L, sae in saes.items():
        alone = attribute(lm, sae, make_data(), AttributionConfig(batch_size=4), layers=L)
        torch.testing.assert_close(both.layers[L].delta_attribution,
                                   alone.layers[L].delta_attribution, rtol=1e-6, atol=1e-9)


def test_abar_sources():
    lm = loaded()
    sae = random_sae(32, 16, layer=1, mean=False).double()
    data = make_data()
    res = attribute(lm, sae, data, AttributionConfig(abar="auto"))
    assert res.layers[1].abar_source == "dataset"
    hs = []
    for c in data:
        p, q = prompt_ids(lm.tokenizer, c.prompt), completion_ids(lm.tokenizer, c.completion)
        with torch.no_grad():
            hs.append(lm.model(input_ids=torch.tensor([p + q]),
                               output_hidden_states=True).hidden_states[2][0])
    torch.testing.assert_close(res.layers[1].a_bar.double(), torch.cat(hs).mean(0).float().double(),
                               rtol=1e-5, atol=1e-6)
    zero = attribute(lm, sae, data, AttributionConfig(abar="zero")).layers[1]
    assert zero.abar_source == "zero" and not zero.a_bar.any()
    with pytest.raises(LatentAuditError, match="stores no mean activation"):
        attribute(lm, sae, data, AttributionConfig(abar="sae"))


# -- the first-order estimate against the exact ablation ------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_is_the_derivative_of_the_exact_ablation(arch):
    """(ℓ(+ε) − ℓ(−ε))/2ε → δ as ε → 0, where ℓ(ε) removes ε × the latent's projection:
    error < 1e-3 relative + 5e-6 at ε = 1e-3 in float64 (Llama's RMSNorm computes in float32, which
    sets the noise floor)."""
    lm = loaded(arch)
    sae = random_sae(32, 12, layer=0).double()
    comp = make_data()[0]
    a_bar = sae.mean_activation
    delta, _ = reference_delta(lm, comp, 0, sae, a_bar)
    dirs = sae.decoder_directions(torch.float64)
    eps = 1e-3
    for i in range(12):
        exact = (ablated_loss(lm, comp, 0, dirs[i], a_bar, eps)
                 - ablated_loss(lm, comp, 0, dirs[i], a_bar, -eps)) / (2 * eps)
        assert abs(exact - delta[i].item()) <= 1e-3 * abs(delta[i].item()) + 5e-6, i


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_mean_ablation_matches_exact_effect(arch):
    """Full mean ablation of each of 24 latents (ā = the sequence's mean activation, so each
    ablation removes only a small part of the activation): the δ vector matches the exact loss
    changes with relative L2 error < 0.25 and Pearson correlation > 0.98 (measured: 0.10–0.12
    and > 0.99)."""
    lm = loaded(arch)
    sae = random_sae(32, 24, layer=0).double()
    comp = make_data()[2]
    dirs = sae.decoder_directions(torch.float64)
    p = prompt_ids(lm.tokenizer, comp.prompt)
    q = completion_ids(lm.tokenizer, comp.completion)
    with torch.no_grad():
        h = lm.model(input_ids=torch.tensor([p + q]), output_hidden_states=True).hidden_states[1]
    a_bar = h[0].mean(0)
    delta, base = reference_delta(lm, comp, 0, sae, a_bar)
    exact = torch.tensor([ablated_loss(lm, comp, 0, dirs[i], a_bar) - base for i in range(24)],
                         dtype=torch.float64)
    assert (exact - delta).norm() / exact.norm() < 0.25
    assert torch.corrcoef(torch.stack([exact, delta]))[0, 1] > 0.98


# -- resumable checkpoints --------------------------------------------------------------------

def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    import latentaudit.attribution.accumulate as engine

    lm = loaded(dtype=torch.float32)
    sae = random_sae(32, 16, layer=1)
    data = make_data()
    cfg = AttributionConfig(batch_size=2, checkpoint_every_batches=1)
    full = attribute(lm, sae, data, cfg).layers[1]
    ckpt = tmp_path / "ckpt.safetensors"
    real, calls = engine.layer_sums, []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "layer_sums", dying)
    with pytest.raises(KeyboardInterrupt):
        attribute(lm, sae, data, cfg, checkpoint=ckpt)
    assert ckpt.exists()
    counted = []
    monkeypatch.setattr(engine, "layer_sums", lambda *a, **k: (counted.append(1), real(*a, **k))[1])
    resumed = attribute(lm, sae, data, cfg, checkpoint=ckpt).layers[1]
    assert len(counted) == 5 - 2  # 10 completions in batches of 2; two were done before the kill
    torch.testing.assert_close(resumed.delta_attribution, full.delta_attribution)
    torch.testing.assert_close(resumed.delta_activation, full.delta_activation)


def test_no_pairs_is_a_clear_error():
    lm = loaded()
    sae = random_sae(32, 8, layer=0).double()
    data = [Completion("p", "x", "positive", "p")]
    with pytest.raises(LatentAuditError, match="no pairs"):
        attribute(lm, sae, data)


def test_mismatched_sae_names_both_numbers():
    lm = loaded()
    sae = random_sae(48, 8, layer=0).double()
    with pytest.raises(ShapeMismatchError, match="d_model=48.*d_model=32"):
        attribute(lm, sae, make_data())


def test_bad_dataset_names_file_line_and_field(tmp_path):
    from latentaudit.data.behaviour import load_behaviour

    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "a", "completion": "b", "label": "positive"}),
        json.dumps({"prompt": "a", "completion": "b", "label": "yes"}),
        "{not json",
        json.dumps({"completion": "b", "label": "negative"}),
    ]))
    with pytest.raises(LatentAuditError) as err:
        load_behaviour(path)
    msg = str(err.value)
    assert f"{path}:2: field 'label'" in msg
    assert f"{path}:3: not valid JSON" in msg
    assert f"{path}:4: field 'prompt'" in msg
    assert "3 problem(s)" in msg


def test_chat_prompts_are_checked_message_by_message(tmp_path):
    from latentaudit.data.behaviour import load_behaviour

    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [], "completion": "b", "label": "positive"},
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "user"}], "completion": "b",
             "label": "negative"},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": "b", "label": "positive"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LatentAuditError) as err:
        load_behaviour(path)
    assert str(err.value).splitlines()[1:] == [
        f"  {path}:1: field 'prompt' must be a non-empty list of chat messages",
        f"  {path}:2: field 'prompt'[1] must be an object with string 'role' and 'content'"]
