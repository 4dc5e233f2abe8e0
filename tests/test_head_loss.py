"""The completion loss computed from the final norm's output in chunks equals the loss from the
model's full logits, value and gradient, and falls back where the head route does not hold."""

from __future__ import annotations

import pytest
import torch

import latentaudit.attribution.loss as H
from latentaudit.attribution.math import completion_losses
from latentaudit.models.forward import keep_logits
from latentaudit.models.hooks import capture_resid
from tiny import tiny_model


def test_chunked_cross_entropy_equals_torch_value_and_gradient(monkeypatch):
    monkeypatch.setattr(H, "CHUNK_BYTES", 4 * 7 * 3)  # 3 rows per chunk: chunks do not divide
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, generator=g,
                                                                          dtype=torch.float64)
    y = torch.randint(0, 7, (10,), generator=g)
    weights = torch.rand(10, generator=g, dtype=torch.float64)
    got = H.head_cross_entropy(h, w, b, y)
    (gh,) = torch.autograd.grad((got * weights).sum(), h)
    ref = torch.nn.functional.cross_entropy(h @ w.T + b, y, reduction="none")
    (rh,) = torch.autograd.grad((ref * weights).sum(), h)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(gh, rh, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: H.head_cross_entropy(x, w, None, y).double(),
                                    (h.detach().clone().requires_grad_(True),), atol=1e-4)


def batch_inputs(vocab: int = 264):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, :7] = 0
    comp = torch.zeros(3, 5, dtype=torch.bool)
    comp[0, 1:] = comp[1] = True
    comp[2, 3:] = True
    return dict(input_ids=ids, attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=False), comp


def by_logits(model, inputs, comp, layer):
    k = comp.shape[1]
    with capture_resid(model, [layer], grad_from=layer) as store:
        logits = model(**inputs, **keep_logits(model, k + 1)).logits[:, -(k + 1):-1]
    losses = completion_losses(logits, inputs["input_ids"][:, -k:], comp)
    return losses, torch.autograd.grad(losses.sum(), store[layer])[0]


def by_head(model, inputs, comp, layer):
    k = comp.shape[1]
    with capture_resid(model, [layer], grad_from=layer) as store:
        losses = H.completion_losses_of(model, k, inputs["input_ids"][:, -k:], comp, **inputs)
    return losses, torch.autograd.grad(losses.sum(), store[layer])[0]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_completion_loss_equals_the_full_logits_route(arch, monkeypatch):
    monkeypatch.setattr(H, "CHUNK_BYTES", 4 * 264 * 4)  # 4 rows per chunk
    kw = {"d_model": 64} if arch == "gemma2" else {}
    model = tiny_model(arch, seed=2, **kw)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 0.05  # strong enough to change these logits
    inputs, comp = batch_inputs()
    want, want_g = by_logits(model, inputs, comp, 0)
    got, got_g = by_head(model, inputs, comp, 0)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got_g, want_g, atol=1e-5)
    assert H._ROUTE[model] is (arch == "llama")  # gemma-2 soft-caps its logits: full logits
