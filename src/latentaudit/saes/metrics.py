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


def _replaced_losses(model: nn.Module, layer: int, ids: Tensor, mask: Tensor | None,
                     replacements: Sequence[Tensor | SAE | None], skip_first: int) -> Tensor:
    """(summed CE, predictions) per replacement of resid_post at ``layer`` (None: clean)."""
    def loss(new) -> Tensor:
        hooks = {} if new is None else {layer: lambda h: replace_from(
            h, new(h) if isinstance(new, SAE) else new, skip_first)}
        with resid_hooks(model, hooks):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return next_token_loss(logits, ids, mask)

    return torch.stack([loss(new) for new in replacements]).double().cpu()  # (R, 2)


@torch.no_grad()
def ce_loss_increase(model: nn.Module, sae: SAE, input_ids: Int[Tensor, "batch pos"], layer: int,
                     mean_activation: Float[Tensor, " d_model"], *,
                     attention_mask: Int[Tensor, "batch pos"] | None = None,
                     skip_first: int = 1) -> CELoss:
    """Cross-entropy clean / with the SAE spliced in / mean-ablated at layer ``layer``."""
    dev = next(model.parameters()).device
    mask = None if attention_mask is None else attention_mask.to(dev)
    sums = _replaced_losses(model, layer, input_ids.to(dev), mask,
                            [None, sae.to(dev), mean_activation.to(dev)], skip_first)  # (3, 2)
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
    """Tokens behind FVU, L0 and the dead fraction."""
    ce_tokens: int = 0
    """Tokens (predictions) behind the CE losses."""


class _Tally:
    """Float64 running sums for one SAE's FVU, L0 and fired latents."""

    def __init__(self, sae: SAE) -> None:
        self.sq_err = 0.0
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        self.active = 0

    def add(self, sae: SAE, x: Float[Tensor, "rows d_model"]) -> None:
        f = sae.encode(x)  # (N, S)
        x_hat = sae(x)  # (N, D): undoes an input normalisation, unlike decode(f)
        self.sq_err += float((x - x_hat).double().pow(2).sum())
        self.fired |= (f != 0).any(0).cpu()
        self.active += int((f != 0).sum())


@torch.no_grad()
def evaluate_saes(model: nn.Module, saes: Sequence[SAE], sequences: Sequence[Sequence[int]],
                  layer: int, mean_activation: Float[Tensor, " d_model"], *,
                  skip_first: int = 1, batch_size: int = 8, pad_id: int = 0,
                  ce_sequences: int | None = None) -> list[Evaluation]:
    """FVU, L0 and dead fraction of every SAE (same layer) over all ``sequences``, and the CE
    increase over the first ``ce_sequences`` (None: all). One pass up to ``layer`` per batch
    serves every SAE; the CE pass shares its clean and mean-ablated forwards between them."""
    dev = next(model.parameters()).device
    saes = [sae.to(dev) for sae in saes]
    mean = mean_activation.to(dev)
    tallies = [_Tally(sae) for sae in saes]
    sq_norm, n = 0.0, 0
    total = torch.zeros(saes[0].d_model, dtype=torch.float64)
    ce = torch.zeros(len(saes) + 2, 2, dtype=torch.float64)  # clean, ablated, spliced...
    n_ce = len(sequences) if ce_sequences is None else ce_sequences
    for start, batch in progress(list(_chunks(sequences, batch_size)), desc="evaluate",
                                 unit="batch"):
        ids, mask = (t.to(dev) for t in pad_batch(batch, pad_id))
        hidden = run_until(model, [layer], input_ids=ids, attention_mask=mask)[layer]
        keep = mask.bool()  # (B, T)
        keep[:, :skip_first] = False
        x = hidden[keep].float()  # (N, D)
        for sae, tally in zip(saes, tallies, strict=True):
            tally.add(sae, x)
        sq_norm += float(x.double().pow(2).sum())
        total += x.double().sum(0).cpu()
        n += len(x)
        if start < n_ce:
            rows = slice(0, min(len(batch), n_ce - start))
            ce += _replaced_losses(model, layer, ids[rows], mask[rows], [None, mean, *saes],
                                   skip_first)
    variance = max(sq_norm - float(total.pow(2).sum()) / max(n, 1), 1e-30)
    clean, ablated, *spliced = (ce[:, 0] / ce[:, 1].clamp_min(1)).tolist()
    return [Evaluation(fvu=t.sq_err / variance, l0=t.active / max(n, 1),
                       dead_fraction=float(1 - t.fired.double().mean()),
                       ce=CELoss(clean, s, ablated), tokens=n, ce_tokens=int(ce[0, 1]))
            for t, s in zip(tallies, spliced, strict=True)]


def evaluate_sae(model: nn.Module, sae: SAE, sequences: Sequence[Sequence[int]], layer: int,
                 mean_activation: Float[Tensor, " d_model"], *, skip_first: int = 1,
                 batch_size: int = 8, pad_id: int = 0,
                 ce_sequences: int | None = None) -> Evaluation:
    """:func:`evaluate_saes` for one SAE."""
    return evaluate_saes(model, [sae], sequences, layer, mean_activation, skip_first=skip_first,
                         batch_size=batch_size, pad_id=pad_id, ce_sequences=ce_sequences)[0]


def _chunks(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for i in range(0, len(items), size):
        yield i, items[i:i + size]
