"""Circuits and monitors at hook points other than resid_post, on the tiny models of every
supported architecture: Δ-edges between SAEs at attn_out / mlp_out / resid_pre against central
finite differences of the exact mean ablation there, the upstream latents' own Δ-attribution
against the attribution stage at that point, and a monitor fit on an mlp_out SAE reading what a
raw hook on the MLP sees."""

from __future__ import annotations

import json

import pytest
import torch

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.circuit import CircuitConfig, trace_circuit
from latentaudit.cli import main
from latentaudit.data.behaviour import load_pairs
from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import capture_resid, layer_list, resid_hooks
from latentaudit.saes import load_sae
from test_circuit import make_run, measure, sequence
from test_hook_points import ARCHS, model_of
from tiny import random_sae

# (upstream point at layer 0, target point at layer 2)
PAIRS = [("mlp_out", "attn_out"), ("attn_out", "mlp_out"), ("resid_pre", "resid_post")]


def at(sae, point: str):
    sae.info.hook = point
    return sae


def clean(lm, comp, lower, upper, points):
    """a² and g² = ∂ℓ/∂a² at the target's point, one completion alone."""
    p, q, ids = sequence(lm, comp)
    with capture_resid(lm.model, [lower, upper], grad_from=upper,
                       point={lower: points[0], upper: points[1]}) as store:
        logits = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(q))
    (g2,) = torch.autograd.grad(loss, store[upper])
    return store[upper][0].detach(), g2[0]


def ablated_a2(lm, comp, lower, upper, points, direction, a_bar, mask, eps):
    _, _, ids = sequence(lm, comp)

    def ablate(h):
        return h - eps * (((h - a_bar) @ direction) * mask.to(h))[..., None] * direction

    with resid_hooks(lm.model, {lower: ablate}, points[0]), \
            capture_resid(lm.model, [upper], point=points[1]) as store, torch.no_grad():
        lm.model(input_ids=ids)
    return store[upper][0]


def finite_difference_edges(lm, root, lower, upper, points, targets, kind, eps=1e-3):
    """Mean over pairs of Δy_i(C+) − Δy_i(C−) by central differences of ε × the mean ablation
    of each upstream latent at its point (completion positions)."""
    up = load_sae(root / f"sae{lower}", dtype="fp32")
    target_sae = load_sae(root / f"sae{upper}", dtype="fp32")
    dirs, a_bar = up.decoder_directions().double(), up.mean_activation.double()
    rows, pairing = load_pairs(root / "data.jsonl")
    total = torch.zeros(len(targets), len(dirs), dtype=torch.float64)
    for c, w in zip(rows, pairing.weights(len(rows)), strict=True):
        if w == 0:
            continue
        p, _, ids = sequence(lm, c)
        mask = (torch.arange(ids.shape[1]) >= len(p)).double()
        _, g2 = clean(lm, c, lower, upper, points)
        for j, d in enumerate(dirs):
            hi = ablated_a2(lm, c, lower, upper, points, d, a_bar, mask, eps)
            lo = ablated_a2(lm, c, lower, upper, points, d, a_bar, mask, -eps)
            for n, i in enumerate(targets):
                change = measure(kind, hi, g2, target_sae, i, mask, mask) \
                    - measure(kind, lo, g2, target_sae, i, mask, mask)
                total[n, j] += w * change / (2 * eps)
    return total


# every architecture at one pair of points, every pair on llama
CASES = [(arch, PAIRS[n % len(PAIRS)]) for n, arch in enumerate(ARCHS)] + [
    ("llama", pair) for pair in PAIRS[1:]]


@pytest.mark.parametrize(("arch", "points"), CASES,
                         ids=[f"{a}-{'-'.join(p)}" for a, p in CASES])
def test_circuit_edges_at_hook_points_are_the_derivative_of_the_ablation(tmp_path, arch, points):
    lm = model_of(arch)
    saes = {0: at(random_sae(32, 5, layer=0, seed=3), points[0]),
            2: at(random_sae(32, 10, layer=2, seed=4), points[1])}
    # Padded float64 Gemma-2 batches come out NaN (a float32 softmax): one per batch there.
    batch = 1 if arch == "gemma2" else 3
    run = make_run(tmp_path, lm, saes, [2], positions="completion", batch_size=batch)
    kind = "loss" if arch != "gpt2" else "pre-activation"
    cfg = CircuitConfig(top_k=2, measure=kind, batch_size=batch,
                        fraction=1.0, max_edges=0, route="stacked")
    result = trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm, out=tmp_path / "c")
    hop = result.hops[0]
    assert (hop.upstream_hook, hop.target_hook) == points
    assert hop.route == "one-at-a-time"  # a replay of whole layers does not pass these points
    row = json.loads((tmp_path / "c" / "circuit.json").read_text())["hops"][0]
    assert (row["upstream_hook"], row["target_hook"]) == points
    # Gemma-2's norms compute in float32: a larger step keeps its rounding below the check
    eps = 1e-2 if arch == "gemma2" else 1e-3
    fd = finite_difference_edges(lm, tmp_path, 0, 2, points, hop.targets, kind, eps)
    scale = fd.abs().max()
    assert scale > 0
    assert (hop.edges.double() - fd).abs().max() <= 1e-3 * scale + 1e-8
    at_lower = attribute(lm, str(tmp_path / "sae0"), str(tmp_path / "data.jsonl"),
                         AttributionConfig(batch_size=cfg.batch_size, positions="completion")
                         ).layers[0].delta_attribution
    torch.testing.assert_close(hop.upstream_delta, at_lower, rtol=1e-4,
                               atol=1e-5 * at_lower.abs().max())


def test_a_circuit_refuses_an_sae_at_a_point_it_does_not_read(tmp_path):
    lm = model_of("llama")
    saes = {0: random_sae(32, 6, layer=0, seed=3), 2: random_sae(32, 10, layer=2, seed=4)}
    run = make_run(tmp_path, lm, saes, [2])
    odd = at(random_sae(32, 6, layer=0, seed=5), "attn_z").save(tmp_path / "odd")
    with pytest.raises(LatentAuditError, match="reads the hook point attn_z"):
        trace_circuit(run, str(odd), CircuitConfig(top_k=2), model=lm)


# ---- monitors ----------------------------------------------------------------------------------

def test_a_monitor_reads_an_mlp_out_sae_at_the_mlp_output(tmp_path, tiny_model_dir, capsys):
    from latentaudit.models.load import load_model
    from latentaudit.monitor.file import load_monitor
    from latentaudit.monitor.read import encode, read_reductions, to_completion
    from test_monitor import rows, write

    sae = at(random_sae(32, 40, layer=1, seed=4), "mlp_out")
    folder = sae.save(tmp_path / "sae")
    train = write(tmp_path / "judged.jsonl", rows(range(4, 8)))
    out = tmp_path / "monitor.safetensors"
    assert main(["monitor", "fit", "--completions", str(train), "--model", str(tiny_model_dir),
                 "--sae", str(folder), "--latents", "1,2,3,5,8", "--folds", "2", "--out",
                 str(out), "--device", "cpu"]) == 0
    assert load_monitor(out).hook == "mlp_out"

    lm = load_model(str(tiny_model_dir), device="cpu")
    data = rows(range(20, 21))
    comps = [to_completion(r, "x", n) for n, r in enumerate(data, start=1)]
    seqs = encode(lm.tokenizer, comps, None)
    red = read_reductions(lm, sae, 1, seqs, None, batch_size=4, desc=None)
    seen = []
    handle = layer_list(lm.model)[1].mlp.register_forward_hook(
        lambda m, args, o: seen.append(o))
    try:
        with torch.no_grad():
            for p, q in seqs:
                lm.model(input_ids=torch.tensor([p + q]))
    finally:
        handle.remove()
    direct = torch.stack([sae.encode(h[0, len(p):]).mean(0)
                          for h, (p, _) in zip(seen, seqs, strict=True)])
    torch.testing.assert_close(red.latent_mean, direct, rtol=1e-4, atol=1e-5)

    # the same weights relabelled at resid_post are another SAE for this monitor
    at(sae, "resid_post").save(tmp_path / "relabelled")
    scored = write(tmp_path / "new.jsonl", data)
    assert main(["monitor", "score", "--monitor", str(out), "--completions", str(scored),
                 "--sae", str(tmp_path / "relabelled"), "--out", str(tmp_path / "s.jsonl"),
                 "--device", "cpu"]) == 2
    assert "reads the hook point mlp_out (field 'hook')" in capsys.readouterr().err
