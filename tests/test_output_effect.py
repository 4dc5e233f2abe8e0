"""The output-centric description of a latent against a direct computation: the whole model run
with the decoder layer's output edited by a plain forward hook, log-probabilities read at the
reply's positions by hand."""

from __future__ import annotations

import pytest
import torch

from latentaudit.attribution.plan import encode_completions
from latentaudit.errors import LatentAuditError
from latentaudit.explain.effect import add_direction, logprob_shift, moved_tokens, output_effects
from latentaudit.models.hooks import layer_list
from test_attribute import loaded, make_data
from test_explain import small_cfg, tiny_run  # noqa: F401 (a fixture)
from tiny import random_sae


def _direct_shift(model, layer, seqs, edit):
    """Mean over reply positions of log p(edited) − log p(clean), the decoder layer's output
    replaced by ``edit(h)`` through a forward hook on the layer module itself."""

    def hook(_module, _args, out):
        if isinstance(out, tuple):
            return (edit(out[0]), *out[1:])
        return edit(out)

    total, count = 0.0, 0
    for p, q in seqs:
        ids = torch.tensor([p + q])
        with torch.no_grad():
            clean = model(input_ids=ids).logits[0, len(p) - 1:-1].log_softmax(-1)
            handle = layer_list(model)[layer].register_forward_hook(hook)
            try:
                edited = model(input_ids=ids).logits[0, len(p) - 1:-1].log_softmax(-1)
            finally:
                handle.remove()
        total = total + (edited - clean).sum(0)
        count += len(q)
    return total / count


@pytest.mark.parametrize(("arch", "layer"), [("llama", 0), ("llama", 1), ("gpt2", 1)])
def test_output_effect_equals_the_upper_layers_run_by_hand(arch, layer):
    lm = loaded(arch, layers=3)
    sae = random_sae(32, 5, layer=layer, seed=3).double()
    seqs = encode_completions(lm.tokenizer, make_data()[:3], None)
    dirs = sae.decoder_directions(torch.float64)
    a_bar = sae.mean_activation
    got = output_effects(lm.model, layer, seqs, dirs, a_bar, alpha=2.5, batch=2)
    assert got.route == "upper-layers"
    assert got.positions == sum(len(q) for _, q in seqs)
    for i in range(len(dirs)):
        d = dirs[i]
        added = _direct_shift(lm.model, layer, seqs, lambda h, d=d: h + 2.5 * d)
        ablated = _direct_shift(lm.model, layer, seqs,
                                lambda h, d=d: h - ((h - a_bar) @ d)[..., None] * d)
        # Llama's RMSNorm computes in float32 whatever the model dtype: that noise floor
        torch.testing.assert_close(got.added[i], added, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.ablated[i], ablated, rtol=1e-5, atol=1e-7)
        assert got.added[i].abs().max() > 1e-3  # the edit moves the output


def test_full_forward_route_equals_the_replay():
    lm = loaded("qwen2", layers=3)
    sae = random_sae(32, 4, layer=1, seed=5).double()
    seqs = encode_completions(lm.tokenizer, make_data()[3:5], None)
    dirs = sae.decoder_directions(torch.float64)
    up = output_effects(lm.model, 1, seqs, dirs, sae.mean_activation, 1.0)
    full = output_effects(lm.model, 1, seqs, dirs, sae.mean_activation, 1.0,
                          route="full-forward")
    assert (up.route, full.route) == ("upper-layers", "full-forward")
    torch.testing.assert_close(up.added, full.added, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(up.ablated, full.ablated, rtol=1e-9, atol=1e-12)


def test_a_nan_forward_stops_the_output_effect_with_its_cause():
    """A model whose weights hold a NaN: the output effect says so instead of writing NaN
    token shifts to the explain files."""
    lm = loaded("qwen2", layers=3)
    sae = random_sae(32, 2, layer=1, seed=5).double()
    seqs = encode_completions(lm.tokenizer, make_data()[:1], None)
    with torch.no_grad():
        layer_list(lm.model)[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(LatentAuditError, match=r"explain: the output effect of layer 1 \(added "
                                               r"latents\): \d+ of \d+ values are not finite"):
        output_effects(lm.model, 1, seqs, sae.decoder_directions(torch.float64),
                       sae.mean_activation, 1.0)


def test_pieces_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert add_direction(h, dirs, 3.0).tolist() == [[[4.0, 0.0], [3.0, 2.0]],
                                                    [[1.0, 3.0], [0.0, 5.0]]]
    clean = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    edited = torch.log(torch.tensor([[[0.25, 0.75], [0.75, 0.25]]]))
    want = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))  # .5·3, 1.5·(1/3)
    torch.testing.assert_close(logprob_shift(clean, edited), want)

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

        def decode(self, ids):
            return "".join(f"t{i}" for i in ids)

    moved = moved_tokens(torch.tensor([0.1, -2.0, 3.0, 0.0]), Tok(), 2)
    assert [t["token_id"] for t in moved["rises"]] == [2, 0]
    assert [t["token_id"] for t in moved["falls"]] == [1, 3]
    assert moved["rises"][0]["value"] == pytest.approx(3.0)


def test_explain_rows_carry_the_effect_of_the_upper_layers(tiny_run, tmp_path):  # noqa: F811
    """The driver's rows: α = strength × the mean residual norm of the completions it names
    (first position of each left out), and the listed tokens are the extremes of the shift
    computed by hand on those completions."""
    from latentaudit.data.behaviour import load_behaviour
    from latentaudit.explain import explain_latents

    lm, root, corpus = tiny_run
    res = explain_latents(root / "run", None, small_cfg(corpus, effect_texts=3, top_k=3),
                          model=lm, out=tmp_path / "x", cache_dir=tmp_path)
    data = {c.line: c for c in load_behaviour(root / "data.jsonl")}
    sae = random_sae(32, 40, layer=1).double()  # the run's SAE (same seed as the fixture)
    for row in res.latents:
        eff = row["output_effect"]
        assert eff["strength"] == 0.2 and len(eff["completions"]) == 3
        seqs = encode_completions(lm.tokenizer, [data[n] for n in eff["completions"]], None)
        with torch.no_grad():
            norms = torch.cat([lm.model(input_ids=torch.tensor([p + q]), output_hidden_states=True)
                               .hidden_states[2][0, 1:].norm(dim=-1) for p, q in seqs])
        assert eff["alpha"] == pytest.approx(0.2 * norms.mean().item(), rel=1e-5)
        d = sae.decoder_directions(torch.float64)[row["latent"]]
        want = _direct_shift(lm.model, 1, seqs, lambda h, d=d, a=eff["alpha"]: h + a * d)
        rises = [t["token_id"] for t in eff["added"]["rises"]]
        falls = [t["token_id"] for t in eff["added"]["falls"]]
        assert rises == want.topk(len(rises)).indices.tolist()
        assert falls == (-want).topk(len(falls)).indices.tolist()
        assert eff["added"]["rises"][0]["value"] == pytest.approx(want.max().item(), rel=1e-5)
    off = explain_latents(root / "run", None, small_cfg(corpus, effect_texts=0, top_k=2),
                          model=lm, out=tmp_path / "y", cache_dir=tmp_path)
    assert all(r["output_effect"] is None for r in off.latents)
