"""The forward-only stages (probe judge, monitor reading, Δ-activation reading, residual norm,
first-token log-odds) give what a straightforward reference gives: each sequence alone, a full
forward with ``output_hidden_states`` (or a steering hook and the full logits), nothing cut,
sorted or batched. Sequences of very different lengths in a scrambled order and small batches,
so sorting by length, padding within a batch and stopping the forward early are all exercised."""

from __future__ import annotations

import pytest
import torch

from latentaudit.judges.base import JudgeItem
from latentaudit.judges.probe import Head, Probe, ProbeJudge, Reading, judge_prompt
from latentaudit.judges.rubrics import load_rubric
from latentaudit.models.hooks import resid_hooks
from tiny import random_sae

TEXTS = ["a much longer completion that goes on and on for a good while, then stops.", "ok",
         "", "Yes, that is right: the claim holds.", "No.", "a middle-sized reply here"]


@pytest.fixture(scope="module")
def lm():
    from latentaudit.models.load import prepare
    from tiny import tiny_model, tiny_tokenizer

    return prepare(tiny_model(seed=5, layers=3), tiny_tokenizer(), name="tiny")


def hidden(lm, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Hidden states of one unpadded sequence: [L + 1] is layer L's output (the last entry is
    the final norm's, so the tests read layers below the top)."""
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def seqs(lm) -> list[tuple[list[int], list[int]]]:
    tok = lm.tokenizer
    return [(tok(f"Q{i}: " + "x" * (7 * i % 11))["input_ids"],
             tok(t or "?", add_special_tokens=False)["input_ids"]) for i, t in enumerate(TEXTS)]


def test_probe_grades_equal_a_per_item_full_forward(lm):
    rubric = load_rubric("false-belief")
    q = next(x for x in rubric.questions if x.name == "validation")
    question = "Did your reply agree?"
    items = [JudgeItem("Is it so?", t, prompt_id=f"p{i}", sample_index=0)
             for i, t in enumerate(TEXTS)]
    x = []
    for item in items:  # the reference features: each conversation alone, the whole model
        ids, (a, b) = judge_prompt(lm.tokenizer, item, question)
        hs = hidden(lm, ids)
        x.append(torch.cat([hs[1][0, -1], hs[2][0, a:b].mean(0)]))
    x = torch.stack(x)  # (N, 2D)
    g = torch.Generator().manual_seed(1)
    c = len(q.labels)
    head = Head(list(q.labels), question, [Reading(0, "last"), Reading(1, "answer")],
                torch.randn(c, x.shape[1], generator=g), torch.zeros(c), x.mean(0),
                x.std(0) + 1e-6)
    probe = Probe(model="tiny", rubric=rubric.name, heads={"validation": head})
    got = ProbeJudge(probe, rubric, model=lm, batch_size=4).grade(items)
    for verdict, p in zip(got, head.probs(x), strict=True):
        want = q.from_probs(dict(zip(head.labels, p.tolist(), strict=True)), rubric.min_mass)
        answer = verdict.answers["validation"]
        assert answer.label == want.label
        assert answer.probs.keys() == want.probs.keys()
        for k, prob in want.probs.items():
            assert answer.probs[k] == pytest.approx(prob, abs=2e-4)
    assert len({v.answers["validation"].label for v in got}) > 1  # the labels differ: can fail


def test_monitor_reading_equals_a_per_completion_full_forward(lm):
    from latentaudit.monitor.read import read_reductions

    sae = random_sae(lm.d_model, 48, layer=1)
    data = seqs(lm)
    red = read_reductions(lm, sae, 1, data, batch_size=4, desc=None)
    for i, (p, q) in enumerate(data):
        h = hidden(lm, p + q)[2][0, len(p):]  # (k, D) the completion's tokens
        f = sae.encode(h)
        assert torch.allclose(red.latent_mean[i], f.mean(0), atol=1e-5)
        assert torch.allclose(red.latent_max[i], f.max(0).values, atol=1e-5)
        assert torch.allclose(red.resid_mean[i], h.mean(0), atol=1e-5)


def test_delta_activation_reading_equals_a_per_completion_full_forward(lm):
    from latentaudit.steer.diff import mean_completion_activation

    sae = random_sae(lm.d_model, 48, layer=0, seed=2)
    data = seqs(lm)
    got = mean_completion_activation(lm, sae, 0, data, batch_size=4)
    f = torch.cat([sae.encode(hidden(lm, p + q)[1][0, len(p):]) for p, q in data])
    assert torch.allclose(got, f.mean(0), atol=1e-5)


def test_residual_norm_equals_a_per_sequence_full_forward(lm):
    from latentaudit.models.norm import mean_resid_norm

    full = [p + q for p, q in seqs(lm)]
    got = mean_resid_norm(lm, 1, full, batch_size=4)
    norms = torch.cat([hidden(lm, s)[2][0, 1:].norm(dim=-1) for s in full])  # first left out
    assert got == pytest.approx(float(norms.mean()), rel=1e-5)


@pytest.mark.parametrize("layer", [0, 2])
def test_log_odds_equal_steered_full_forwards_one_at_a_time(lm, layer):
    from latentaudit.steer.logodds import Signature, log_odds_grid

    prompts = [p for p, _ in seqs(lm)][:4]
    sig = Signature((10, 20, 30), (40, 50), ())
    vecs = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(3)) * 3.0
    vecs[0] = 0
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()]
    grid = log_odds_grid(lm, layer, prompts, vecs, sig, batch_size=2)  # (C, P)
    assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks)
                     for m in lm.model.modules()]  # none left behind
    for c, v in enumerate(vecs):
        for j, p in enumerate(prompts):
            with resid_hooks(lm.model, {layer: lambda h, v=v: h + v}), torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([p])).logits[0, -1].double()
            logp = torch.log_softmax(logits, -1)
            want = torch.logsumexp(logp[[10, 20, 30]], 0) - torch.logsumexp(logp[[40, 50]], 0)
            assert float(grid[c, j]) == pytest.approx(float(want), abs=1e-4)
    assert not torch.allclose(grid[1], grid[0], atol=1e-3)  # steering moved them
