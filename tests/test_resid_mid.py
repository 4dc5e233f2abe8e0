"""Hook point resid_mid (the residual stream after the attention, before the MLP; SAELens
``blocks.L.hook_resid_mid``) on the tiny models of every architecture that has one: where it
sits (the MLP's pre-norm input, found by name here), attribution there against finite
differences and an independent gradient route, the exact ablation of explain, steering there,
and one clear error on blocks whose attention and MLP read the same input."""

from __future__ import annotations

import pytest
import torch

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.data.behaviour import make_pairs
from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import RowSteering, capture_resid, layer_list, steer_resid
from latentaudit.models.load import prepare
from latentaudit.saes.formats._read import parse_hook
from test_attribute import make_data
from test_hook_points import ablated_loss, ids_of, model_of, reference_delta
from tiny import hook_count, random_sae, seen_mean_norm, tiny_config, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox_sequential"]


def sequential_neox(layers: int = 3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("gpt_neox", layers=layers)
    cfg.use_parallel_residual = False
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval().requires_grad_(False)
    return prepare(model, tiny_tokenizer(), name="tiny-gpt_neox-sequential")


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return sequential_neox() if request.param == "gpt_neox_sequential" else model_of(request.param)


def mlp_norm(block):
    """The norm in front of the MLP, by name (not through hook_site)."""
    for name in ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm"):
        if hasattr(block, name):
            return getattr(block, name)
    raise AssertionError(type(block).__name__)


def test_resid_mid_is_the_input_of_the_mlp_norm_and_observing_it_changes_nothing(lm):
    _, _, ids = ids_of(lm, make_data()[0])
    seen = []
    handle = mlp_norm(layer_list(lm.model)[1]).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            clean = lm.model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    with torch.no_grad(), capture_resid(lm.model, [1], point="resid_mid") as mid, \
            capture_resid(lm.model, [1], point="mlp_out") as mlp:
        logits = lm.model(input_ids=ids).logits
    assert torch.equal(logits, clean.logits)  # observed under no_grad: bit-exact
    torch.testing.assert_close(mid[1], seen[0])
    torch.testing.assert_close(mid[1] + mlp[1], clean.hidden_states[2])


def test_delta_is_the_derivative_of_the_ablation_at_resid_mid(lm):
    sae = random_sae(32, 6, layer=1).double()
    comp = make_data()[0]
    dirs, a_bar = sae.decoder_directions(torch.float64), sae.mean_activation
    delta = reference_delta(lm, comp, 1, "resid_mid", dirs, a_bar)
    eps = 1e-3
    for i in range(6):
        exact = (ablated_loss(lm, comp, 1, "resid_mid", dirs[i], a_bar, eps)
                 - ablated_loss(lm, comp, 1, "resid_mid", dirs[i], a_bar, -eps)) / (2 * eps)
        assert abs(exact - delta[i].item()) <= 1e-3 * abs(delta[i].item()) + 5e-6, i


def test_the_engine_attributes_at_resid_mid(lm):
    sae = random_sae(32, 20, layer=1).double()
    sae.info.hook = "resid_mid"
    data = make_data()
    batch = 1 if lm.name == "tiny-gemma2" else 3  # padded float64 Gemma-2 batches are NaN
    result = attribute(lm, sae, data, AttributionConfig(batch_size=batch, abar="sae"))
    dirs = sae.decoder_directions(torch.float64)
    per = [reference_delta(lm, c, 1, "resid_mid", dirs, sae.mean_activation) for c in data]
    pairs = make_pairs(data).pairs
    expected = sum(per[p] - per[q] for p, q in pairs) / len(pairs)
    torch.testing.assert_close(result.layers[1].delta_attribution.double(), expected,
                               rtol=1e-4, atol=1e-7)


def test_explain_exact_effect_at_resid_mid(lm):
    """The exact check ablates resid_mid: checked against raw hooks that rebuild it by hand
    (the layer's input plus the attention branch, found by name)."""
    from latentaudit.explain.exact import exact_changes

    sae = random_sae(32, 4, layer=1).double()
    comp = make_data()[0]
    p, q, ids = ids_of(lm, comp)
    dirs, a_bar = sae.decoder_directions(torch.float64), sae.mean_activation
    got = exact_changes(lm.model, 1, [(p, q)], dirs, a_bar, "all", batch=2, point="resid_mid")
    block = layer_list(lm.model)[1]
    attn = (block.post_attention_layernorm if hasattr(block, "pre_feedforward_layernorm")
            else getattr(block, "self_attn", None) or getattr(block, "attn", None)
            or block.attention)

    def loss(direction=None):
        pre = []
        hooks = [block.register_forward_pre_hook(
            lambda m, args, kwargs: pre.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)]
        if direction is not None:
            def ablate(module, args, out):
                o = out[0] if isinstance(out, tuple) else out
                h = pre[-1] + o
                o = o - ((h - a_bar) @ direction)[..., None] * direction
                return (o, *out[1:]) if isinstance(out, tuple) else o
            hooks.append(attn.register_forward_hook(ablate))
        try:
            with torch.no_grad():
                out = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
        finally:
            for h in hooks:
                h.remove()
        return torch.nn.functional.cross_entropy(out, torch.tensor(q)).item()

    base = loss()
    for i in range(4):
        assert got.change[0, i].item() == pytest.approx(loss(dirs[i]) - base, rel=1e-6, abs=1e-9)


def test_steering_at_resid_mid_is_steering_the_attention_branch(lm):
    """Adding v to resid_mid equals adding v to attn_out (what makes resid_mid); strength 0
    changes nothing; adding it at resid_pre differs (the attention then sees it)."""
    _, _, ids = ids_of(lm, make_data()[0])
    v = torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3

    def logits(point, vec):
        with steer_resid(lm.model, RowSteering(1, vec, point)), torch.no_grad():
            return lm.model(input_ids=ids).logits

    before = hook_count(lm.model)
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
    assert torch.equal(logits("resid_mid", 0 * v), clean)
    torch.testing.assert_close(logits("resid_mid", v), logits("attn_out", v))
    assert not torch.allclose(logits("resid_mid", v), logits("resid_pre", v))
    assert hook_count(lm.model) == before


def test_parallel_blocks_have_no_resid_mid_and_saelens_names_it():
    lm = model_of("gpt_neox", layers=2)  # use_parallel_residual by default
    with pytest.raises(LatentAuditError, match="'resid_mid' does not exist in GPTNeoXForCausalLM"):
        with capture_resid(lm.model, [0], point="resid_mid"):
            pass
    assert parse_hook("blocks.7.hook_resid_mid") == (7, "resid_mid")


def test_the_log_odds_check_and_the_norm_at_resid_mid(lm):
    """The log-odds replay steering resid_mid equals full forwards; r̄ there is the mean norm
    of the MLP norm's input."""
    from latentaudit.models.norm import mean_resid_norm
    from latentaudit.steer.logodds import Signature, log_odds_grid, log_odds_rows

    texts = ["Is the earth flat?", "Tell me a story"]
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    sig = Signature((10, 20, 30), (40, 50), ())
    vecs = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    grid = log_odds_grid(lm, 1, ids, vecs, sig, 2, "resid_mid")
    rows = log_odds_rows(lm, 1, ids, vecs.repeat(2, 1), torch.arange(2).repeat_interleave(3),
                         sig, 1, "resid_mid").view(2, 3).T
    torch.testing.assert_close(grid, rows, rtol=1e-4, atol=1e-4)
    seen = []
    handle = mlp_norm(layer_list(lm.model)[1]).register_forward_pre_hook(
        lambda m, args: seen.append(args[0]))
    assert mean_resid_norm(lm, 1, ids, batch_size=1, point="resid_mid") == pytest.approx(
        seen_mean_norm(lm.model, handle, seen, ids), rel=1e-6)
