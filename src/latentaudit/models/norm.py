"""The mean norm of a hook point over reference text: the unit of steering strengths and of
explain's output effect (r̄; the first position of each sequence, an attention sink, left out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._progress import progress
from latentaudit.data.tokens import left_pad, length_batches
from latentaudit.models.forward import pad_id
from latentaudit.models.hooks import run_until
from latentaudit.models.load import LoadedModel


def norm_sums(hidden: Float[Tensor, "batch pos d_model"], mask: Tensor) -> tuple[float, int]:
    """Σ ‖h_t‖ and the count over the unmasked positions after each row's first real token."""
    first = mask.float().cumsum(1) == 1  # (B, T) each row's first real token
    keep = mask.bool() & ~first
    norms = hidden.float().norm(dim=-1)  # (B, T)
    return float(norms[keep].sum()), int(keep.sum())


@torch.no_grad()
def mean_resid_norm(loaded: LoadedModel, layer: int, sequences: Sequence[Sequence[int]],
                    batch_size: int = 8, point: str = "resid_post") -> float:
    """r̄: the mean norm of hook point ``point`` (default resid_post) of ``layer`` over
    ``sequences`` (first positions left out)."""
    pad = pad_id(loaded.tokenizer)
    total, count = 0.0, 0
    with progress(total=len(sequences), desc="residual norm", unit="seq") as bar:
        for idx in length_batches([len(s) for s in sequences], batch_size):
            batch = left_pad([list(sequences[i]) for i in idx], pad)
            dev = loaded.device
            h = run_until(loaded.model, [layer], input_ids=batch.input_ids.to(dev),
                          attention_mask=batch.attention_mask.to(dev),
                          position_ids=batch.position_ids.to(dev), point=point)[layer]
            s, n = norm_sums(h.cpu(), batch.attention_mask)
            total, count = total + s, count + n
            bar.update(len(batch.input_ids))
    if count == 0:
        from latentaudit.errors import LatentAuditError

        raise LatentAuditError("the reference text for the residual norm has no tokens after "
                               "the first of each sequence; give longer text.")
    return total / count
