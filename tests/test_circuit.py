"""Circuits against ground truth: the exact effect of mean-ablating an upstream latent's projection
on a target (finite differences on tiny random models, exact where the layers between are
linear), the attribution stage's own δ, batched targets against one at a time, pruning, chains
over three layers, and the command line (its errors before the model loads, circuit.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.attribution.math import batch_moments, center, deltas_from_moments, token_deltas
from latentaudit.attribution.output import write_run
from latentaudit.circuit import CircuitConfig, trace_circuit
from latentaudit.circuit.math import (
    center_stacked,
    edge_moments,
    edges_from_moments,
    loss_cotangents,
    next_targets,
    preactivation_cotangents,
    prune_edges,
)
from latentaudit.cli import main
from latentaudit.data.behaviour import load_pairs
from latentaudit.data.tokens import completion_ids, prompt_ids
from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import capture_resid, layer_list, resid_hooks
from latentaudit.models.load import prepare
from latentaudit.saes import load_sae
from test_attribute import make_data
from tiny import random_sae, tiny_model, tiny_tokenizer


def loaded(arch="llama", dtype=torch.float64, layers=3, **kw):
    return prepare(tiny_model(arch, dtype=dtype, layers=layers, **kw), tiny_tokenizer(),
                   name=f"tiny-{arch}")


def write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": c.prompt, "completion": c.completion,
                                        "label": c.label, "prompt_id": c.prompt_id}) + "\n"
                            for c in make_data()))
    return path


def make_run(root: Path, lm, saes: dict[int, object], run_layers: list[int],
             positions: str = "all", top_k: int = 3, batch_size: int = 4) -> Path:
    """SAE folders ``root/sae{L}``, the dataset and an attribution run at ``run_layers``."""
    for L, sae in saes.items():
        sae.save(root / f"sae{L}")
    data = write_data(root / "data.jsonl")
    cfg = AttributionConfig(batch_size=batch_size, positions=positions, top_k=top_k)
    result = attribute(lm, {L: str(root / f"sae{L}") for L in run_layers}, str(data), cfg)
    write_run(root / "run", result)
    return root / "run"


class LinearLayer(nn.Module):
    """A decoder layer that is linear in its input: the residual plus a causal running mean of
    the positions so far, mixed by a fixed matrix."""

    def __init__(self, d_model: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(d_model, d_model, generator=g,
                                              dtype=torch.float64) * 0.3)

    def forward(self, hidden_states, *args, **kwargs):
        T = hidden_states.shape[1]
        steps = torch.arange(1, T + 1, dtype=hidden_states.dtype, device=hidden_states.device)
        mean = hidden_states.cumsum(1) / steps[:, None]  # (B, T, D)
        return hidden_states + mean @ self.W.to(hidden_states)


# -- the ground truth: the exact effect of mean-ablating an upstream latent ---------------------

def sequence(lm, comp):
    p = prompt_ids(lm.tokenizer, comp.prompt)
    q = completion_ids(lm.tokenizer, comp.completion)
    return p, q, torch.tensor([p + q])


def clean(lm, comp, lower: int, upper: int):
    """a¹, a² and g² = ∂ℓ/∂a² of one completion, alone (no padding)."""
    p, q, ids = sequence(lm, comp)
    with capture_resid(lm.model, [lower, upper], grad_from=upper) as store:
        logits = lm.model(input_ids=ids).logits[0, len(p) - 1:-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(q))
    (g2,) = torch.autograd.grad(loss, store[upper])
    return store[lower][0].detach(), store[upper][0].detach(), g2[0]


def ablated_a2(lm, comp, lower: int, upper: int, direction, a_bar, mask, eps=1.0):
    """a² when ε × (the upstream latent's projection − ā's) is removed from a¹ where ``mask``."""
    _, _, ids = sequence(lm, comp)

    def ablate(h):
        proj = ((h - a_bar) @ direction) * mask.to(h)  # (1, T)
        return h - eps * proj[..., None] * direction

    with resid_hooks(lm.model, {lower: ablate}), capture_resid(lm.model, [upper]) as store, \
            torch.no_grad():
        lm.model(input_ids=ids)
    return store[upper][0]


def measure(kind: str, a2, g2, target_sae, i: int, mask2, comp_mask):
    """y_i of a² (g² held): the target's contribution to the loss, or its pre-activation summed
    over the completion."""
    if kind == "loss":  # ā² is left out: it cancels in a change of y_i
        d = target_sae.decoder_directions(torch.float64)[i]
        return float(((g2 @ d) * (a2 @ d) * mask2).sum())
    with torch.no_grad():
        return float((target_sae.double().pre_activation(a2)[:, i] * comp_mask).sum())


def exact_delta_edges(lm, root: Path, run_layer: int, lower: int, targets: list[int], kind: str,
                      positions: str = "all", eps: float = 1.0, central: bool = False):
    """Mean over the run's pairs of Δy_i(C+) − Δy_i(C−), Δy_i(C) the change of y_i when latent j
    of the upstream SAE is mean-ablated (``eps`` × its projection; central differences / 2ε with
    ``central``): [targets, d_sae]."""
    up = load_sae(root / f"sae{lower}", dtype="fp32")
    target_sae = load_sae(root / f"sae{run_layer}", dtype="fp32")
    dirs = up.decoder_directions().double()
    a_bar = up.mean_activation.double()
    rows, pairing = load_pairs(root / "data.jsonl")
    weights = pairing.weights(len(rows))
    total = torch.zeros(len(targets), len(dirs), dtype=torch.float64)
    for c, w in zip(rows, weights, strict=True):
        if w == 0:
            continue
        p, q, ids = sequence(lm, c)
        T = ids.shape[1]
        comp_mask = (torch.arange(T) >= len(p)).double()
        mask = torch.ones(T, dtype=torch.float64) if positions == "all" else comp_mask
        _, a2, g2 = clean(lm, c, lower, run_layer)
        for j, d in enumerate(dirs):
            hi = ablated_a2(lm, c, lower, run_layer, d, a_bar, mask, eps)
            lo = ablated_a2(lm, c, lower, run_layer, d, a_bar, mask, -eps) if central else a2
            for n, i in enumerate(targets):
                change = measure(kind, hi, g2, target_sae, i, mask, comp_mask) \
                    - measure(kind, lo, g2, target_sae, i, mask, comp_mask)
                total[n, j] += w * change / (2 * eps if central else 1.0)
    return total


@pytest.fixture(scope="module")
def linear_between(tmp_path_factory):
    """A 3-layer model whose layer 1 (between the SAEs at 0 and 1) is linear, and its run."""
    lm = loaded()
    layer_list(lm.model)[1] = LinearLayer(32)
    root = tmp_path_factory.mktemp("linear")
    saes = {0: random_sae(32, 12, layer=0, seed=1), 1: random_sae(32, 16, layer=1, seed=2)}
    return lm, root, make_run(root, lm, saes, [1])


@pytest.mark.parametrize("kind", ["loss", "pre-activation"])
def test_edges_are_exact_where_the_layers_between_are_linear(linear_between, kind):
    """Full mean ablation of each upstream latent: the Δ-edges equal the exact change of every
    target's measure (one completion per pass: the linear layer's running mean would read the
    padding)."""
    lm, root, run = linear_between
    cfg = CircuitConfig(top_k=3, measure=kind, batch_size=1, fraction=1.0, max_edges=0,
                        route="stacked")
    hop = trace_circuit(run, str(root / "sae0"), cfg, model=lm, out=root / kind).hops[0]
    assert hop.route == "stacked"
    exact = exact_delta_edges(lm, root, 1, 0, hop.targets, kind)
    scale = exact.abs().max()
    assert scale > 0
    torch.testing.assert_close(hop.edges.double(), exact, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["loss", "pre-activation"])
def test_edges_are_the_derivative_of_the_exact_ablation(tmp_path, arch, kind):
    """Nonlinear layers between (attention, MLP, norms): (y(+ε) − y(−ε))/2ε → Δ-edge, with ε × the
    upstream latent's projection removed (float64; Llama's RMSNorm computes in float32, which
    sets the noise floor)."""
    lm = loaded(arch, layers=3)
    saes = {0: random_sae(32, 8, layer=0, seed=3), 2: random_sae(32, 12, layer=2, seed=4)}
    run = make_run(tmp_path, lm, saes, [2], positions="completion")
    cfg = CircuitConfig(top_k=2, measure=kind, batch_size=3, fraction=1.0, max_edges=0)
    hop = trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm, out=tmp_path / "c").hops[0]
    fd = exact_delta_edges(lm, tmp_path, 2, 0, hop.targets, kind, positions="completion",
                           eps=1e-3, central=True)
    scale = fd.abs().max()
    assert scale > 0
    assert (hop.edges.double() - fd).abs().max() <= 1e-4 * scale + 1e-7


def test_edges_out_of_a_latent_add_up_to_its_delta_attribution(tmp_path):
    """Over a complete orthonormal set of targets, Σ_i ∂c_i/∂a² = g², so the loss-measure edges
    out of an upstream latent add up to its own Δ-attribution, as the attribution stage computes
    it at that layer (and as the hop reports it)."""
    lm = loaded(layers=3)
    basis = random_sae(32, 32, layer=2, seed=5)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    basis.W_dec.data = q.T.to(basis.W_dec)
    saes = {1: random_sae(32, 20, layer=1, seed=6), 2: basis}
    run = make_run(tmp_path, lm, saes, [2], top_k=32)
    cfg = CircuitConfig(top_k=32, fraction=1.0, max_edges=0, target_batch=11)
    hop = trace_circuit(run, str(tmp_path / "sae1"), cfg, model=lm, out=tmp_path / "c").hops[0]
    assert sorted(hop.targets) == list(range(32))
    at_lower = attribute(lm, str(tmp_path / "sae1"), str(tmp_path / "data.jsonl"),
                         AttributionConfig(batch_size=4)).layers[1].delta_attribution
    scale = at_lower.abs().max()
    torch.testing.assert_close(hop.edges.sum(0), at_lower, rtol=1e-3, atol=1e-4 * scale)
    torch.testing.assert_close(hop.upstream_delta, at_lower, rtol=1e-4, atol=1e-5 * scale)


# -- batching ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_stacked_targets_equal_one_at_a_time_and_padding_changes_nothing(tmp_path, arch):
    lm = loaded(arch, dtype=torch.float32, layers=4)
    saes = {0: random_sae(32, 24, layer=0, seed=7), 3: random_sae(32, 16, layer=3, seed=8)}
    run = make_run(tmp_path, lm, saes, [3], top_k=5)

    def edges(**kw):
        cfg = CircuitConfig(top_k=5, fraction=1.0, max_edges=0, **kw)
        return trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm,
                             out=tmp_path / "c").hops[0]

    stacked = edges(batch_size=4, target_batch=2, route="stacked")
    single = edges(batch_size=4, route="one-at-a-time")
    alone = edges(batch_size=1, target_batch=5, route="stacked")
    on_cpu = edges(batch_size=4)  # auto: one at a time on the CPU
    assert stacked.route == alone.route == "stacked" and single.route == "one-at-a-time"
    assert on_cpu.route == "one-at-a-time" and torch.equal(on_cpu.edges, single.edges)
    scale = single.edges.abs().max()
    for other in (stacked, alone):
        assert other.targets == single.targets
        torch.testing.assert_close(other.edges, single.edges, rtol=1e-3, atol=1e-4 * scale)
        torch.testing.assert_close(other.upstream_delta, single.upstream_delta, rtol=1e-3,
                                   atol=1e-4 * single.upstream_delta.abs().max())


def test_a_replay_that_does_not_reproduce_the_clean_pass_falls_back(tmp_path, monkeypatch):
    import latentaudit.circuit.passes as passes

    lm = loaded(dtype=torch.float32)
    saes = {0: random_sae(32, 10, layer=0, seed=9), 2: random_sae(32, 10, layer=2, seed=10)}
    run = make_run(tmp_path, lm, saes, [2])
    cfg = CircuitConfig(top_k=3, fraction=1.0, max_edges=0, route="stacked")
    good = trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm, out=tmp_path / "a").hops[0]
    real = passes.run_layers
    monkeypatch.setattr(passes, "run_layers", lambda *a: real(*a) * 1.01)
    bad = trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm, out=tmp_path / "b").hops[0]
    assert good.route == "stacked" and bad.route == "one-at-a-time"
    torch.testing.assert_close(bad.edges, good.edges, rtol=1e-3,
                               atol=1e-4 * good.edges.abs().max())


def test_max_prompts_traces_over_the_first_prompts_only(tmp_path):
    """max_prompts = N gives the circuit of a dataset holding only the first N prompts' rows."""
    lm = loaded(dtype=torch.float32)
    saes = {0: random_sae(32, 10, layer=0, seed=9), 2: random_sae(32, 10, layer=2, seed=10)}
    run = make_run(tmp_path, lm, saes, [2])
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    first = list(dict.fromkeys(r["prompt_id"] for r in rows))[:2]
    assert len({r["prompt_id"] for r in rows}) > 2
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt_id"] in first))
    targets = [int(i) for i in run_targets(run)]
    cfg = CircuitConfig(fraction=1.0, max_edges=0)
    cut = trace_circuit(run, str(tmp_path / "sae0"), CircuitConfig(fraction=1.0, max_edges=0,
                                                                   max_prompts=2),
                        model=lm, targets=targets, out=tmp_path / "cut")
    ref = trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm, targets=targets,
                        data=part, out=tmp_path / "ref")
    assert cut.graph["counts"] == ref.graph["counts"] and cut.graph["counts"]["prompts"] == 2
    torch.testing.assert_close(cut.hops[0].edges, ref.hops[0].edges)
    full = trace_circuit(run, str(tmp_path / "sae0"), cfg, model=lm, targets=targets,
                         out=tmp_path / "full")
    assert full.graph["counts"]["pairs"] > cut.graph["counts"]["pairs"]


def run_targets(run: Path) -> list[int]:
    return [json.loads(line)["latent"] for line in (run / "ranking.jsonl").read_text()
            .splitlines()][:3]


# -- pure functions on hand-built tensors ---------------------------------------------------------

def test_moment_route_equals_the_per_token_route():
    g = torch.Generator().manual_seed(0)
    K, B, T, D, S = 3, 2, 6, 8, 20
    u = torch.randn(K, B, T, D, generator=g, dtype=torch.float64)
    a = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, -0.5], dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    a_bar = torch.randn(D, generator=g, dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.randn(S, D, generator=g, dtype=torch.float64),
                                         dim=1)
    m = edge_moments(u, a, w, mask)
    for i in range(K):
        one = batch_moments(u[i], a, w, mask)
        torch.testing.assert_close(m.M_raw[i], one.M_raw)
        torch.testing.assert_close(m.u_sum[i], one.g_sum)
    fast = edges_from_moments(center_stacked(m.M_raw, m.u_sum, a_bar), dirs)
    slow = torch.stack([sum(w[b] * token_deltas(u[i, b][mask[b]], a[b][mask[b]], a_bar,
                                                dirs).sum(0) for b in range(B))
                        for i in range(K)])
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(center_stacked(m.M_raw, m.u_sum, a_bar)[1],
                               center(m.M_raw[1], m.u_sum[1], a_bar))
    torch.testing.assert_close(fast[2], deltas_from_moments(
        center(m.M_raw[2], m.u_sum[2], a_bar), dirs))


def test_loss_cotangents_by_hand():
    g = torch.tensor([[[2.0, 3.0], [1.0, 0.0]]])  # (B=1, T=2, D=2)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False]])
    v = loss_cotangents(g, d, mask)
    assert v.shape == (2, 1, 2, 2)
    assert v[0, 0].tolist() == [[2.0, 0.0], [0.0, 0.0]]  # (g·d_0) d_0 at t=0, masked at t=1
    assert v[1, 0].tolist() == [[0.0, 3.0], [0.0, 0.0]]


def test_preactivation_cotangents_are_encoder_columns():
    sae = random_sae(8, 5, seed=1).double()
    acts = torch.randn(2, 3, 8, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    v = preactivation_cotangents(sae, acts, [4, 1], mask)
    for n, i in enumerate([4, 1]):
        want = sae.W_enc[:, i][None, None, :] * mask[..., None]
        torch.testing.assert_close(v[n], want.expand_as(v[n]).to(v))


def test_pruning_keeps_the_stated_fraction_and_no_more():
    edges = torch.tensor([[5.0, -3.0, 1.0, 0.5, 0.5, 0.0],
                          [0.0, 0.0, -2.0, 0.0, 0.0, 0.0],
                          [0.0] * 6])
    p = prune_edges(edges, 0.8)
    # row 0: total 10; 5 + 3 = 8 reaches 80% with the two strongest
    assert p.keep[0].tolist() == [True, True, False, False, False, False]
    assert p.keep[1].tolist() == [False, False, True, False, False, False]
    assert not p.keep[2].any() and p.total[2] == 0
    assert p.total.tolist() == [10.0, 2.0, 0.0] and p.kept.tolist() == [8.0, 2.0, 0.0]
    assert prune_edges(edges, 0.81).keep[0].sum() == 3
    assert prune_edges(edges, 1.0).keep[0].sum() == 5  # zero edges are never kept
    assert prune_edges(edges, 1.0, max_edges=2).keep.sum(1).tolist() == [2, 1, 0]
    g = torch.Generator().manual_seed(2)
    big = torch.randn(4, 300, generator=g) ** 3
    for fraction in (0.1, 0.5, 0.9, 0.99):
        keep = prune_edges(big, fraction).keep
        mag = big.abs().double()
        kept = (mag * keep).sum(1)
        assert (kept >= fraction * mag.sum(1) - 1e-9).all()
        weakest = torch.where(keep, mag, torch.inf).min(1).values
        assert (kept - weakest < fraction * mag.sum(1)).all()  # one fewer would not do
        assert ((mag * ~keep).max(1).values <= weakest).all()  # the strongest are the kept


def test_next_targets_are_the_upstream_latents_with_most_kept_weight():
    edges = torch.tensor([[1.0, -4.0, 0.5, 2.0], [3.0, 0.0, 0.0, -2.5]])
    keep = prune_edges(edges, 0.7).keep
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert next_targets(edges, keep, 2) == [3, 1]  # 2 + 2.5 = 4.5 > 4 > 3
    assert next_targets(edges, keep, 10) == [3, 1, 0]


# -- chains --------------------------------------------------------------------------------------

def test_a_chain_over_three_layers_is_hop_by_hop(tmp_path):
    lm = loaded(layers=4, dtype=torch.float32)
    saes = {0: random_sae(32, 16, layer=0, seed=11), 1: random_sae(32, 18, layer=1, seed=12),
            2: random_sae(32, 20, layer=2, seed=13)}
    run = make_run(tmp_path, lm, saes, [1, 2], top_k=4)
    cfg = CircuitConfig(top_k=3, fraction=0.6, max_edges=4)
    chain = trace_circuit(run, [str(tmp_path / "sae1"), str(tmp_path / "sae0")], cfg, layer=2,
                          model=lm, out=tmp_path / "chain")
    top, low = chain.hops
    assert (top.upstream_layer, top.target_layer, low.upstream_layer, low.target_layer) == \
        (1, 2, 0, 1)
    assert low.targets == next_targets(top.edges, top.keep, 3) and len(low.targets) == 3
    direct = trace_circuit(run, {0: str(tmp_path / "sae0")}, cfg, layer=1, targets=low.targets,
                           model=lm, out=tmp_path / "direct").hops[0]
    torch.testing.assert_close(direct.edges, low.edges)
    g = chain.graph
    assert g["layers"] == [0, 1, 2]
    layer_of = {n["id"]: n["layer"] for n in g["nodes"]}
    assert {(layer_of[e["source"]], layer_of[e["target"]]) for e in g["edges"]} == {(1, 2), (0, 1)}
    assert {n["role"] for n in g["nodes"]} == {"target", "intermediate", "upstream"}
    assert all(f"1:{i}" in layer_of for i in low.targets)


# -- the command line and its files ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("circuit_cli")
    random_sae(32, 24, layer=0, seed=14).save(root / "sae0")
    random_sae(32, 40, layer=1, seed=15).save(root / "sae1")
    random_sae(48, 10, layer=0, seed=16).save(root / "wide")
    random_sae(32, 10, layer=1, seed=17).save(root / "same-layer")
    data = write_data(root / "data.jsonl")
    assert main(["attribute", "--model", str(tiny_model_dir), "--sae", str(root / "sae1"),
                 "--data", str(data), "--out", str(root / "run"), "--top-k", "6",
                 "--device", "cpu"]) == 0
    return root


def circuit(root: Path, *extra: str) -> int:
    return main(["circuit", "--from", str(root / "run"), "--upstream-sae", str(root / "sae0"),
                 "--top-k", "3", "--device", "cpu", "--cache-dir", str(root / "cache"), *extra])


def test_the_command_writes_circuit_json(cli_run, capsys):
    assert circuit(cli_run, "--max-edges", "4") == 0
    printed = capsys.readouterr().out
    assert "layer 0 → layer 1 (one-at-a-time, ā: sae)" in printed and "wrote" in printed
    out = cli_run / "run" / "circuit"
    g = json.loads((out / "circuit.json").read_text())
    assert g["schema_version"] == 1 and g["stage"] == "circuit"
    assert set(g) == {"schema_version", "stage", "run", "model", "measure", "positions", "layers",
                      "hops", "nodes", "edges", "dataset", "counts", "options", "versions"}
    assert g["layers"] == [0, 1] and g["measure"] == "loss" and g["counts"]["pairs"] == 6
    ranking = [json.loads(x) for x in (cli_run / "run" / "ranking.jsonl").read_text().splitlines()]
    (hop,) = g["hops"]
    assert hop["targets"] == [r["latent"] for r in ranking[:3]]
    assert set(hop) == {"upstream_layer", "target_layer", "upstream_sae", "targets", "route",
                        "abar_source", "edges_kept", "kept_share"}
    for n in g["nodes"]:
        assert set(n) == {"id", "layer", "latent", "role", "rank", "delta_attribution",
                          "attribution_total", "attribution_kept", "logit_lens", "top_examples"}
        assert n["id"] == f"{n['layer']}:{n['latent']}" and len(n["logit_lens"]) == 10
        assert n["top_examples"] is None  # no cached examples pass for these SAEs
    ids = {n["id"] for n in g["nodes"]}
    assert len(g["edges"]) == hop["edges_kept"] <= 3 * 4
    for e in g["edges"]:
        assert set(e) == {"source", "target", "weight", "share"}
        assert e["source"] in ids and e["target"] in ids and 0 < e["share"] <= 1
    from safetensors.torch import load_file

    t = load_file(out / "circuit.safetensors")
    assert t["edges_L0_L1"].shape == (3, 24) and t["targets_L0_L1"].tolist() == hop["targets"]
    assert t["upstream_delta_L0_L1"].shape == (24,) and t["a_bar_L0_L1"].shape == (32,)
    for e in g["edges"]:
        row = hop["targets"].index(int(e["target"].split(":")[1]))
        assert t["edges_L0_L1"][row, int(e["source"].split(":")[1])].item() == \
            pytest.approx(e["weight"], rel=1e-6)
    assert not [p for p in out.iterdir() if "checkpoint" in p.name or p.name.startswith(".")]


def test_examples_come_from_the_explain_cache(cli_run, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Water boils at one hundred degrees at sea level. " * 30)
    out = tmp_path / "c"
    with monkeypatch.context() as m:  # no fetched corpus: an error before the model loads
        m.setenv("LATENTAUDIT_CACHE", str(tmp_path / "empty"))
        assert circuit(cli_run, "--examples", "--out", str(out)) == 2
    assert "latentaudit circuit: error:" in capsys.readouterr().err
    (cli_run / "run" / "explain").mkdir(exist_ok=True)
    (cli_run / "run" / "explain" / "manifest.json").write_text(json.dumps({"options": {
        "corpus": str(corpus), "corpus_tokens": 200, "context_len": 20, "examples": 4}}))
    try:
        assert circuit(cli_run, "--examples", "--node-examples", "2", "--out", str(out)) == 0
        g = json.loads((out / "circuit.json").read_text())
        shown = [n for n in g["nodes"] if n["top_examples"]]
        assert shown and all(len(n["top_examples"]) <= 2 for n in shown)
        assert set(shown[0]["top_examples"][0]) == {"activation", "max_index", "tokens",
                                                   "activations"}
        # the pass is cached now: no --examples needed
        assert circuit(cli_run, "--node-examples", "2", "--out", str(tmp_path / "again")) == 0
        again = json.loads((tmp_path / "again" / "circuit.json").read_text())
        assert [n["top_examples"] for n in again["nodes"]] == [n["top_examples"]
                                                              for n in g["nodes"]]
    finally:
        (cli_run / "run" / "explain" / "manifest.json").unlink()


@pytest.mark.parametrize("flags, message", [
    (["--upstream-sae", "{root}/missing"], "missing does not exist"),
    (["--upstream-sae", "{root}/same-layer"], "--upstream-layer 1 .* is not below the targets' "
                                              "layer 1"),
    (["--upstream-sae", "{root}/wide"], "d_model=48 but the run's SAE has d_model=32"),
    (["--upstream-sae", "{root}/sae0", "--upstream-layer", "2"],
     r"trained on layer 0 \(field 'layer'\) but layer 2 was requested: pass --upstream-layer 0"),
    (["--upstream-sae", "{root}/sae0", "--fraction", "0"], r"--fraction must be in \(0, 1\]"),
    (["--upstream-sae", "{root}/sae0", "--targets", "99"], "--targets 99: out of range"),
    (["--upstream-sae", "{root}/sae0", "--layer", "0"], "--layer 0 is not a layer of the run"),
    (["--upstream-sae", "{root}/sae0", "--data", "{root}/nope.jsonl"], "--data .*nope.jsonl: no "
                                                                       "such file"),
    (["--upstream-sae", "{root}/sae0", "--out", "{root}/data.jsonl"], "is a file"),
])
def test_bad_inputs_fail_before_the_model_loads(cli_run, monkeypatch, capsys, flags, message):
    import re

    import latentaudit.models.load as model_load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_load, "load_model", refuse)
    argv = ["circuit", "--from", str(cli_run / "run"), "--device", "cpu",
            *[f.format(root=cli_run) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentaudit circuit: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_a_missing_run_is_one_error(tmp_path, capsys):
    assert main(["circuit", "--from", str(tmp_path / "nope"), "--upstream-sae", "x"]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_a_killed_pass_resumes_to_the_same_edges(cli_run, tmp_path, monkeypatch):
    import latentaudit.circuit.passes as passes

    args = ("--top-k", "2", "--batch-size", "2", "--checkpoint-every-batches", "1")
    assert circuit(cli_run, *args, "--out", str(tmp_path / "full")) == 0
    real, calls = passes.add_batch, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(passes, "add_batch", dying)
    assert circuit(cli_run, *args, "--out", str(tmp_path / "killed")) == 130
    assert (tmp_path / "killed" / "L0_L1.checkpoint.safetensors").is_file()
    counted = []
    monkeypatch.setattr(passes, "add_batch", lambda *a, **k: (counted.append(1), real(*a, **k)))
    assert circuit(cli_run, *args, "--out", str(tmp_path / "killed")) == 0
    assert len(counted) == 5 - 2  # 10 completions in batches of 2; two were done before the kill
    from safetensors.torch import load_file

    full = load_file(tmp_path / "full" / "circuit.safetensors")
    resumed = load_file(tmp_path / "killed" / "circuit.safetensors")
    torch.testing.assert_close(resumed["edges_L0_L1"], full["edges_L0_L1"])
    assert not (tmp_path / "killed" / "L0_L1.checkpoint.safetensors").exists()


def test_help_is_fast_and_the_api_is_exported():
    code = ("import sys, latentaudit.cli as c; c.build_parser(); import latentaudit as la; "
            "assert 'torch' not in sys.modules; print('trace_circuit' in la.__all__)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    import latentaudit

    assert latentaudit.trace_circuit is trace_circuit
    assert latentaudit.CircuitConfig is CircuitConfig


def test_options_are_checked():
    with pytest.raises(LatentAuditError, match="--measure 'x' is not one of loss, pre-activation"):
        CircuitConfig(measure="x")
    with pytest.raises(LatentAuditError, match="--target-batch must be at least 1"):
        CircuitConfig(target_batch=0)
    with pytest.raises(LatentAuditError, match="--route"):
        CircuitConfig(route="sideways")
    with pytest.raises(LatentAuditError, match="--max-prompts must be at least 0"):
        CircuitConfig(max_prompts=-1)
