"""Hook points other than resid_post (resid_pre, attn_out, mlp_out) on tiny models of every
supported architecture: where they sit, checked against Hugging Face's hidden states, and
attribution there, checked against finite differences and an independent gradient route."""

from __future__ import annotations

import pytest
import torch

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.attribution.math import token_deltas
from latentaudit.attribution.plan import saes_by_layer
from latentaudit.data.behaviour import make_pairs
from latentaudit.data.tokens import completion_ids, prompt_ids
from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import RowSteering, capture_resid, resid_hooks, steer_resid
from latentaudit.models.load import prepare
from test_attribute import make_data
from tiny import hook_count, random_sae, tiny_config, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox"]
POINTS = ["resid_pre", "attn_out", "mlp_out", "resid_post"]


def model_of(arch: str, layers: int = 3):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch, layers=layers) if arch != "gemma2" else AutoConfig.for_model(
        "gemma2", num_hidden_layers=layers, hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=264,
        max_position_embeddings=1024, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    model.eval().requires_grad_(False)
    return prepare(model, tiny_tokenizer(), name=f"tiny-{arch}")


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return model_of(request.param)


def ids_of(lm, comp):
    p, q = prompt_ids(lm.tokenizer, comp.prompt), completion_ids(lm.tokenizer, comp.completion)
    return p, q, torch.tensor([p + q])


def test_the_points_add_up_to_the_hidden_states(lm):
    """resid_pre(L) = hidden_states[L]; attn_out and mlp_out are what the two branches add, so
    resid_pre + attn_out + mlp_out = resid_post = hidden_states[L + 1]."""
    _, _, ids = ids_of(lm, make_data()[0])
    caught = {}
    with torch.no_grad():
        for point in POINTS:
            with capture_resid(lm.model, [0, 1], point=point) as store:
                hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            caught[point] = {L: store[L].clone() for L in (0, 1)}
    for L in (0, 1):
        c = {k: v[L] for k, v in caught.items()}
        torch.testing.assert_close(c["resid_pre"], hs[L])
        torch.testing.assert_close(c["resid_post"], hs[L + 1])
        torch.testing.assert_close(c["resid_pre"] + c["attn_out"] + c["mlp_out"], hs[L + 1])


def test_steering_at_a_branch_output_moves_the_residual_stream(lm):
    """Adding v at mlp_out of L equals adding v at resid_post of L, and at resid_pre of L + 1
    (exactly); strength 0 changes nothing; no hook stays behind."""
    _, _, ids = ids_of(lm, make_data()[0])
    v = torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def logits(layer, point, vec):
        with steer_resid(lm.model, RowSteering(layer, vec, point)), torch.no_grad():
            return lm.model(input_ids=ids).logits

    before = hook_count(lm.model)
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
    post = logits(0, "resid_post", v)
    torch.testing.assert_close(logits(0, "mlp_out", v), post)
    torch.testing.assert_close(logits(1, "resid_pre", v), post)
    torch.testing.assert_close(logits(0, "attn_out", 0 * v), clean)
    assert not (logits(0, "attn_out", v) - clean).abs().max() < 1e-9
    assert hook_count(lm.model) == before


def ablated_loss(lm, comp, layer, point, direction, a_bar, eps):
    p, q, ids = ids_of(lm, comp)

    def ablate(h):
        return h - eps * ((h - a_bar) @ direction)[..., None] * direction

    with resid_hooks(lm.model, {layer: ablate}, point), torch.no_grad():
        out = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
    return torch.nn.functional.cross_entropy(out, torch.tensor(q)).item()


def reference_delta(lm, comp, layer, point, dirs, a_bar):
    """δ_i(C) with g from a plain capture (no leaf swapped in) and full logits."""
    p, q, ids = ids_of(lm, comp)
    emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture_resid(lm.model, [layer], point=point) as store:
        out = lm.model(inputs_embeds=emb).logits[0, len(p) - 1:-1]
    loss = torch.nn.functional.cross_entropy(out, torch.tensor(q))
    (g,) = torch.autograd.grad(loss, store[layer])
    return token_deltas(g[0], store[layer][0].detach(), a_bar, dirs).sum(0)


@pytest.mark.parametrize("point", ["resid_pre", "attn_out", "mlp_out"])
def test_delta_is_the_derivative_of_the_ablation_at_each_point(lm, point):
    sae = random_sae(32, 6, layer=1).double()
    comp = make_data()[0]
    dirs, a_bar = sae.decoder_directions(torch.float64), sae.mean_activation
    delta = reference_delta(lm, comp, 1, point, dirs, a_bar)
    eps = 1e-3
    for i in range(6):
        exact = (ablated_loss(lm, comp, 1, point, dirs[i], a_bar, eps)
                 - ablated_loss(lm, comp, 1, point, dirs[i], a_bar, -eps)) / (2 * eps)
        assert abs(exact - delta[i].item()) <= 1e-3 * abs(delta[i].item()) + 5e-6, (point, i)


@pytest.mark.parametrize("point", ["resid_pre", "attn_out", "mlp_out"])
def test_the_engine_attributes_at_the_sae_hook_point(lm, point):
    sae = random_sae(32, 20, layer=1).double()
    sae.info.hook = point
    data = make_data()
    # Padded float64 Gemma-2 batches come out NaN (its softmax runs in float32, where float64's
    # mask value is -inf; see test_a_nan_loss_stops_attribution_with_its_cause): one per batch.
    batch = 1 if lm.name == "tiny-gemma2" else 3
    result = attribute(lm, sae, data, AttributionConfig(batch_size=batch, abar="sae"))
    dirs = sae.decoder_directions(torch.float64)
    per = [reference_delta(lm, c, 1, point, dirs, sae.mean_activation) for c in data]
    pairs = make_pairs(data).pairs
    expected = sum(per[p] - per[q] for p, q in pairs) / len(pairs)
    torch.testing.assert_close(result.layers[1].delta_attribution.double(), expected,
                               rtol=1e-4, atol=1e-7)


def test_an_unknown_hook_point_is_one_clear_error():
    sae = random_sae(32, 8, layer=1)
    sae.info.hook = "hook_z"
    with pytest.raises(LatentAuditError, match="reads the hook point hook_z"):
        saes_by_layer([sae], None)
    lm = model_of("llama", layers=2)
    with pytest.raises(LatentAuditError, match="'resid_middle' is not one of"):
        with capture_resid(lm.model, [0], point="resid_middle"):
            pass


def test_a_run_at_mlp_out_is_explained_there(tiny_model_dir, tmp_path, capsys):
    """attribute reads an mlp_out SAE at mlp_out and says so in its manifest; a --hook that
    disagrees is one clear error; explain works on the run (steering, circuits and monitors
    there: test_steer_points.py, test_stage_points.py)."""
    import json
    from pathlib import Path

    from latentaudit.cli import main

    sae = random_sae(32, 24, layer=1)
    sae.info.hook = "mlp_out"
    folder = sae.save(tmp_path / "sae")
    data = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"
    assert main(["attribute", "--model", str(tiny_model_dir), "--sae", str(folder), "--data",
                 str(data), "--out", str(tmp_path / "run"), "--top-k", "5",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["hook"] == "mlp_out"
    assert main(["attribute", "--model", str(tiny_model_dir), "--sae", str(folder), "--data",
                 str(data), "--out", str(tmp_path / "run2"), "--hook", "attn_out"]) == 2
    assert "reads the hook point mlp_out but --hook attn_out" in capsys.readouterr().err
    (tmp_path / "corpus.txt").write_text("Water boils at one hundred degrees at sea level. " * 20)
    assert main(["explain", "--from", str(tmp_path / "run"), "--corpus",
                 str(tmp_path / "corpus.txt"), "--corpus-tokens", "200", "--context-len", "40",
                 "--top-k", "3", "--examples", "2", "--exact-pairs", "2", "--map-pairs", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    exactness = json.loads((tmp_path / "run" / "explain" / "manifest.json").read_text())[
        "exactness"]["1"]
    assert exactness["route"] == "full-forward"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_explain_exact_effect_and_maps_at_mlp_out(arch):
    """The exact check ablates mlp_out (checked against a raw hook on the block's MLP, not
    found through hook_site), and the per-token maps there sum to δ_i(C)."""
    from latentaudit.explain.exact import exact_changes
    from latentaudit.explain.maps import completion_maps
    from latentaudit.models.hooks import layer_list

    lm = model_of(arch)
    sae = random_sae(32, 5, layer=1).double()
    comp = make_data()[0]
    p, q, ids = ids_of(lm, comp)
    dirs, a_bar = sae.decoder_directions(torch.float64), sae.mean_activation
    got = exact_changes(lm.model, 1, [(p, q)], dirs, a_bar, "all", batch=2, point="mlp_out")
    assert got.route == "full-forward"

    def loss(direction=None):
        def ablate(module, args, out):
            return out - ((out - a_bar) @ direction)[..., None] * direction
        handle = layer_list(lm.model)[1].mlp.register_forward_hook(ablate) \
            if direction is not None else None
        try:
            with torch.no_grad():
                out = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
        finally:
            if handle is not None:
                handle.remove()
        return torch.nn.functional.cross_entropy(out, torch.tensor(q)).item()

    base = loss()
    for i in range(5):
        assert got.change[0, i].item() == pytest.approx(loss(dirs[i]) - base, rel=1e-6, abs=1e-9)
    maps = completion_maps(lm, [(p, q)], {1: dirs}, {1: a_bar}, "all", 1, 258, {1: "mlp_out"})
    torch.testing.assert_close(maps[0].deltas[1].sum(0).double(),
                               reference_delta(lm, comp, 1, "mlp_out", dirs, a_bar),
                               rtol=1e-5, atol=1e-6)


def test_a_nan_loss_stops_attribution_with_its_cause():
    """Gemma-2's eager attention takes its softmax in float32, where float64's mask value is
    -inf: a padded row comes out NaN in float64. Attribution says so instead of writing NaN
    Δs; in float32 the same padded batches match one completion per batch."""
    lm = model_of("gemma2")
    sae = random_sae(32, 20, layer=1).double()
    data = make_data()
    with pytest.raises(LatentAuditError, match=r"loss of \d+ of \d+ completions is not finite "
                                               r"\(first: dataset row \d+\).*--dtype float32"):
        attribute(lm, sae, data, AttributionConfig(batch_size=3, abar="sae"))
    ok = attribute(lm, sae, data, AttributionConfig(batch_size=1, abar="sae"))
    assert torch.isfinite(ok.layers[1].delta_attribution).all()
    lm.model.float()
    sae = sae.float()
    one, three = (attribute(lm, sae, data, AttributionConfig(batch_size=b, abar="sae"))
                  for b in (1, 3))
    torch.testing.assert_close(three.layers[1].delta_attribution,
                               one.layers[1].delta_attribution, rtol=1e-4, atol=1e-6)
