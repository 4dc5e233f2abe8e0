"""Steering at every hook point (resid_pre, attn_out, mlp_out, resid_post) on the tiny models of
every supported architecture: strength 0 changes nothing, steering at mlp_out equals a hand-made
hook on the MLP's output, the log-odds check's replay equals full forwards, the norm behind
relative strengths is measured at the steered point, and a sweep steers an mlp_out SAE there."""

from __future__ import annotations

import json

import pytest
import torch

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.generate import generate
from latentaudit.models.hooks import RowSteering, layer_list, steer_resid
from latentaudit.models.norm import mean_resid_norm
from latentaudit.sample import SampleConfig
from latentaudit.steer.logodds import Signature, log_odds_grid, log_odds_rows
from test_hook_points import ARCHS, POINTS, model_of
from test_steer import lines, run_dir, sweep_args  # noqa: F401  (run_dir is a fixture)
from tiny import random_sae, seen_mean_norm

LAYER = 1


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    model = model_of(request.param)
    if request.param == "gemma2":  # a padded float64 Gemma-2 batch is NaN (a float32 softmax)
        model.model.float()
    return model


def prompts(tok) -> list[list[int]]:
    texts = ["Is the earth flat?", "Hi", "Tell me a story about a cat"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def vectors(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 32, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed)) * scale


def mlp_output(model, layer: int) -> torch.nn.Module:
    """The module whose output the block adds to the residual stream as its MLP branch, found
    by name here (not through hook_site): Gemma-2's post-MLP norm, else the MLP itself."""
    block = layer_list(model)[layer]
    return getattr(block, "post_feedforward_layernorm", None) or block.mlp


@pytest.mark.parametrize("point", POINTS)
def test_strength_zero_changes_nothing_at_any_point(lm, point):
    ids = prompts(lm.tokenizer)
    cfg = SampleConfig(max_new_tokens=4, temperature=1.0)
    before = hook_count(lm.model)
    plain = generate(lm, ids, [1, 2, 3], cfg)
    zero = generate(lm, ids, [1, 2, 3], cfg,
                    steering=RowSteering(LAYER, torch.zeros(3, 32, dtype=torch.float64), point))
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    x = torch.tensor([ids[0]])
    with torch.no_grad():
        clean = lm.model(input_ids=x).logits
        with steer_resid(lm.model, RowSteering(LAYER, torch.zeros(1, 32, dtype=torch.float64),
                                               point)):
            assert torch.equal(lm.model(input_ids=x).logits, clean)
        with steer_resid(lm.model, RowSteering(LAYER, vectors(1, 5.0), point)):
            assert not torch.allclose(lm.model(input_ids=x).logits, clean)  # it can fail
    assert hook_count(lm.model) == before


def test_steering_at_mlp_out_equals_a_hand_made_hook_on_the_mlp(lm):
    """generate() and the log-odds check steered at mlp_out against a plain forward hook that
    adds α·d to the MLP's output (greedy, so the token ids must agree exactly)."""
    ids = prompts(lm.tokenizer)
    sae = random_sae(32, 8, layer=LAYER).double()
    d = sae.decoder_directions(torch.float64)[3]
    alpha = 30.0
    cfg = SampleConfig(max_new_tokens=6, temperature=0)
    got = generate(lm, ids, [0, 0, 0], cfg,
                   steering=RowSteering(LAYER, (alpha * d).expand(3, -1).clone(), "mlp_out"))
    handle = mlp_output(lm.model, LAYER).register_forward_hook(
        lambda module, args, out: out + (alpha * d).to(out.dtype))
    try:
        want = generate(lm, ids, [0, 0, 0], cfg)
        with torch.no_grad():
            hand = [lm.model(input_ids=torch.tensor([p])).logits[0, -1] for p in ids]
    finally:
        handle.remove()
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.token_ids for g in got] != [g.token_ids for g in generate(lm, ids, [0] * 3, cfg)]
    sig = Signature((10, 20, 30), (40, 50), ())
    grid = log_odds_grid(lm, LAYER, ids, (alpha * d)[None], sig, 2, "mlp_out")  # (1, P)
    lp = torch.log_softmax(torch.stack(hand), -1)
    expected = lp[:, [10, 20, 30]].logsumexp(-1) - lp[:, [40, 50]].logsumexp(-1)
    torch.testing.assert_close(grid[0].double(), expected.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("layer", [0, LAYER])
def test_log_odds_replay_equals_full_forwards_at_each_point(lm, point, layer):
    ids = prompts(lm.tokenizer)[:2]
    sig = Signature((10, 20, 30), (40, 50), ())
    vecs = vectors(4, 3.0, seed=2)
    vecs[0] = 0
    grid = log_odds_grid(lm, layer, ids, vecs, sig, 3, point)  # (C, P)
    rows = log_odds_rows(lm, layer, ids, vecs.repeat(2, 1), torch.arange(2).repeat_interleave(4),
                         sig, 5, point).view(2, 4).T
    torch.testing.assert_close(grid, rows, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grid[1], grid[0], atol=1e-3)


@pytest.mark.parametrize("point", POINTS)
def test_the_resid_norm_is_measured_at_the_steered_point(lm, point):
    """r̄ at a point: the mean norm of what a raw hook on that module sees, first position of
    each sequence left out (one sequence at a time, so no padding is involved)."""
    ids = prompts(lm.tokenizer)
    block = layer_list(lm.model)[LAYER]
    seen = []
    if point == "resid_pre":
        handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        module = {"resid_post": block, "mlp_out": mlp_output(lm.model, LAYER)}.get(point) or (
            block.post_attention_layernorm if hasattr(block, "pre_feedforward_layernorm")
            else next(getattr(block, n) for n in ("self_attn", "attn", "attention")
                      if hasattr(block, n)))
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    want = seen_mean_norm(lm.model, handle, seen, ids)
    got = mean_resid_norm(lm, LAYER, ids, batch_size=1, point=point)
    assert got == pytest.approx(want, rel=1e-6)  # summed in float32
    if point != "resid_post":
        assert abs(got - mean_resid_norm(lm, LAYER, ids, batch_size=1)) > 1e-6


def test_a_sweep_steers_an_mlp_out_sae_at_mlp_out(run_dir, capsys):  # noqa: F811
    """The sweep reads the hook point from the SAE's config, measures r̄ there and records it;
    a --hook that disagrees with the SAE is refused before any model loads."""
    from latentaudit.models.load import load_model

    sae = random_sae(32, 24, layer=LAYER)
    sae.info.hook = "mlp_out"
    sae.save(run_dir.parent / "sae")
    assert main(sweep_args(run_dir, "--hook", "attn_out", "--logodds-only")) == 2
    assert "reads the hook point mlp_out but --hook attn_out" in capsys.readouterr().err
    assert main(sweep_args(run_dir, "--logodds-only", "--max-prompts", "2")) == 0
    assert json.loads((run_dir / "steer" / "manifest.json").read_text())["hook"] == "mlp_out"
    norm = json.loads((run_dir / "steer" / "resid_norm.json").read_text())
    assert norm["hook"] == "mlp_out"
    from latentaudit.steer import SteerConfig, plan_steering
    from latentaudit.steer.sweep import _encode_all, _sample_config

    def plan(**kw):
        return plan_steering(SteerConfig(max_prompts=2, max_new_tokens=6, **kw), run=run_dir,
                             prompts=run_dir.parent / "prompts.jsonl", judge="rules",
                             coherence_judge=f"rules:{run_dir.parent / 'rules.json'}")

    planned = plan()
    assert planned.hook == "mlp_out"
    loaded = load_model(planned.model, device="cpu")
    seqs = list(_encode_all(loaded, planned, _sample_config(planned.cfg)).values())
    assert norm["resid_norm"] == pytest.approx(
        mean_resid_norm(loaded, LAYER, seqs, point="mlp_out"), rel=1e-5)
    assert norm["resid_norm"] != pytest.approx(mean_resid_norm(loaded, LAYER, seqs), rel=1e-3)
    assert lines(run_dir / "steering_logodds.jsonl")
    sae.info.hook = "resid_post"
    sae.save(run_dir.parent / "sae")
    with pytest.raises(LatentAuditError, match="made with hook='mlp_out'"):
        plan()


def test_the_log_odds_check_stops_on_a_nan_forward_with_its_cause():
    """The same padded float64 Gemma-2 batch in the log-odds check's full-forward route: an
    error naming the rows and the fix, not NaN log-odds; one prompt per forward is finite."""
    lm = model_of("gemma2")
    ids = prompts(lm.tokenizer)
    sig = Signature((10, 20, 30), (40, 50), ())
    vecs = vectors(3, 1.0)
    with pytest.raises(LatentAuditError, match=r"log-odds check: the next-token logits of rows "
                                               r"1–3: \d+ of \d+ values are not finite.*--dtype"):
        log_odds_rows(lm, LAYER, ids, vecs, torch.arange(3), sig, 3)
    assert torch.isfinite(log_odds_rows(lm, LAYER, ids, vecs, torch.arange(3), sig, 1)).all()


def test_generation_stops_on_a_nan_forward_with_its_cause():
    """A padded float64 Gemma-2 batch comes out NaN (its attention softmax runs in float32):
    generation says so instead of sampling noise; in float32 the same batch samples what each
    prompt samples alone."""
    lm = model_of("gemma2")
    ids = prompts(lm.tokenizer)
    cfg = SampleConfig(max_new_tokens=5, temperature=1.0)
    with pytest.raises(LatentAuditError, match=r"logits are not finite at step 1 of batch row "
                                               r"\d of 3.*--dtype float32"):
        generate(lm, ids, [1, 2, 3], cfg)
    assert len(generate(lm, ids[:1], [1], cfg)[0].token_ids) >= 1  # one prompt: no padding
    lm.model.float()
    together = generate(lm, ids, [1, 2, 3], cfg)
    alone = [generate(lm, [p], [s], cfg)[0] for p, s in zip(ids, [1, 2, 3], strict=True)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
