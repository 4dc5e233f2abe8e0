"""How good an SAE is at a hook point: small pure metrics plus one evaluation driver.

- FVU (fraction of variance unexplained) = Σ||x - x̂||² / Σ||x - mean(x)||² over all tokens.
- L0 = mean number of active (non-zero) latents per token.
- Dead fraction = share of latents with no activation over the last N tokens.
- CE-loss increase: the model's mean next-token cross-entropy when resid_post of layer L is
  replaced by the SAE's reconstruction, minus the clean loss; also as a percentage of the
  increase caused by mean ablation (resid_post replaced by ā). Both replacements act at
  positions >= ``skip_first`` only: position 0 (BOS, the attention sink) is left untouched,
  because SAEs are trained without it and replacing it would dominate both numbers. Padding
  positions carry no loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from latentaudit._progress import progress
from latentaudit.models.hooks import resid_hooks, run_until
from latentaudit.saes.harvest import pad_batch
from latentaudit.saes.sae import SAE


def fvu(x: Float[Tensor, "... d_model"], x_hat: Float[Tensor, "... d_model"]) -> float:
    """Σ||x - x̂||² / Σ||x - mean(x)||² (mean over every token)."""
    x = x.reshape(-1, x.shape[-1]).double()  # (N, D)
    x_hat = x_hat.reshape(-1, x.shape[-1]).double()  # (N, D)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def l0(acts: Float[Tensor, "... d_sae"]) -> float:
    """Mean number of non-zero latents per token."""
    return float((acts != 0).sum(-1).double().mean())


def dead_fraction(acts: Float[Tensor, "... d_sae"]) -> float:
    """Share of latents that are zero on every token of ``acts`` (the last N tokens)."""
    fired = (acts.reshape(-1, acts.shape[-1]) != 0).any(0)  # (S,)
    return float(1 - fired.double().mean())


def next_token_loss(logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"],
                    attention_mask: Int[Tensor, "batch pos"] | None = None) -> Tensor:
    """Summed next-token cross-entropy over real positions, and the number of predictions."""
    targets = input_ids[:, 1:]  # (B, T-1)
    ce = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                     reduction="none")  # (B, T-1)
    if attention_mask is not None:
        real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # (B, T-1)
        ce = ce[real]
    return torch.stack([ce.sum(), torch.tensor(float(ce.numel()), device=ce.device)])


def replace_from(hidden: Tensor, new: Tensor, skip_first: int) -> Tensor:
    """``hidden`` with positions >= ``skip_first`` taken from ``new`` (broadcast)."""
    out = hidden.clone()  # (B, T, D)
    out[:, skip_first:] = new.expand_as(hidden)[:, skip_first:].to(hidden.dtype)
    return out


class CELoss(NamedTuple):
    """Mean next-token cross-entropy under three conditions, and the SAE's damage."""

    clean: float
    spliced: float
    """With the SAE reconstruction at layer L."""
    ablated: float
    """With ā at layer L."""

    @property
    def increase(self) -> float:
        return self.spliced - self.clean

    @property
    def increase_pct(self) -> float:
        """The increase as % of mean ablation's increase (nan when that is 0)."""
        base = self.ablated - self.clean
        return 100 * self.increase / base if base else float("nan")


@torch.no_grad()
def ce_loss_increase(model: nn.Module, sae: SAE, input_ids: Int[Tensor, "batch pos"], layer: int,
                     mean_activation: Float[Tensor, " d_model"], *,
                     attention_mask: Int[Tensor, "batch pos"] | None = None,
                     skip_first: int = 1) -> CELoss:
    """Cross-entropy clean / with the SAE spliced in / mean-ablated at layer ``layer``."""
    dev = next(model.parameters()).device
    sae = sae.to(dev)
    ids = input_ids.to(dev)
    mask = None if attention_mask is None else attention_mask.to(dev)
    mean = mean_activation.to(dev)

    def loss(fn=None) -> Tensor:
        hooks = {} if fn is None else {layer: fn}
        with resid_hooks(model, hooks):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return next_token_loss(logits, ids, mask)

    def splice(h: Tensor) -> Tensor:
        return replace_from(h, sae(h), skip_first)

    def ablate(h: Tensor) -> Tensor:
        return replace_from(h, mean, skip_first)

    sums = torch.stack([loss(), loss(splice), loss(ablate)])  # (3, 2)
    clean, spliced, ablated = (sums[:, 0] / sums[:, 1].clamp_min(1)).tolist()
    return CELoss(clean, spliced, ablated)


class Evaluation(NamedTuple):
    """An SAE's quality on held-out text at its layer."""

    fvu: float
    l0: float
    dead_fraction: float
    """Latents never active on the evaluation tokens."""
    ce: CELoss
    tokens: int


def evaluate_sae(model: nn.Module, sae: SAE, sequences: Sequence[Sequence[int]], layer: int,
                 mean_activation: Float[Tensor, " d_model"], *, skip_first: int = 1,
                 batch_size: int = 8, pad_id: int = 0) -> Evaluation:
    """FVU, L0, dead fraction and CE increase of ``sae`` over ``sequences`` (batched)."""
    sq_err = sq_norm = 0.0
    total = torch.zeros(sae.d_model, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    active = n = 0
    ce = torch.zeros(3, 2, dtype=torch.float64)
    for batch in progress(list(_chunks(sequences, batch_size)), desc="evaluate", unit="batch"):
        ids, mask = pad_batch(batch, pad_id)
        dev = next(model.parameters()).device
        hidden = run_until(model, [layer], input_ids=ids.to(dev),
                           attention_mask=mask.to(dev))[layer]  # (B, T, D)
        keep = mask.bool().to(dev)
        keep[:, :skip_first] = False
        x = hidden[keep].float()  # (N, D)
        with torch.no_grad():
            f = sae.to(dev).encode(x)  # (N, S)
            x_hat = sae(x)  # (N, D)
        sq_err += float((x - x_hat).double().pow(2).sum())
        sq_norm += float(x.double().pow(2).sum())
        total += x.double().sum(0).cpu()
        fired |= (f != 0).any(0).cpu()
        active += int((f != 0).sum())
        n += len(x)
        r = ce_loss_increase(model, sae, ids, layer, mean_activation, attention_mask=mask,
                             skip_first=skip_first)
        preds = int((mask[:, 1:].bool() & mask[:, :-1].bool()).sum())
        ce += torch.tensor([[v * preds, preds] for v in r], dtype=torch.float64)
    variance = sq_norm - float(total.pow(2).sum()) / max(n, 1)
    means = (ce[:, 0] / ce[:, 1].clamp_min(1)).tolist()
    return Evaluation(fvu=sq_err / max(variance, 1e-30), l0=active / max(n, 1),
                      dead_fraction=float(1 - fired.double().mean()), ce=CELoss(*means),
                      tokens=n)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
