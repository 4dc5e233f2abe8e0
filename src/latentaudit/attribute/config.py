"""Configuration and result types of the attribution stage."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from latentaudit.errors import LatentAuditError

ABAR_SOURCES = ("auto", "sae", "dataset", "zero")
POSITIONS = ("all", "completion")


@dataclass
class AttributionConfig:
    """Options of the attribution stage."""

    batch_size: int = 8
    """Completions per forward/backward pass."""
    abar: str = "auto"
    """Mean activation ā for mean ablation: sae (stored with the SAE), dataset (mean over the
    dataset's own tokens), zero, or auto (sae when the SAE stores one, else dataset)."""
    positions: str = "all"
    """Positions t summed in δ_i(C): all (prompt and completion) or completion (only its tokens)."""
    pairing: str = "all"
    """Pairs within a prompt: all (every positive×negative) or matched (one-to-one)."""
    top_k: int = 100
    """Latents written to ranking.jsonl (per layer)."""
    delta_activation: bool = True
    """Also compute the Δ-activation baseline (one SAE encoder pass over completion tokens; the
    only SAE-side cost that grows with d_sae during the pass)."""
    checkpoint_every: int = 20
    """Batches between resumable checkpoints of the accumulators (0 = never)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LatentAuditError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.abar not in ABAR_SOURCES:
            raise LatentAuditError(f"--abar '{self.abar}' is not one of {', '.join(ABAR_SOURCES)}.")
        if self.positions not in POSITIONS:
            raise LatentAuditError(
                f"--positions '{self.positions}' is not one of {', '.join(POSITIONS)}.")
        if self.top_k < 1:
            raise LatentAuditError(f"--top-k must be at least 1, got {self.top_k}.")


@dataclass
class LayerAttribution:
    """Everything attribution computed at one layer."""

    layer: int
    delta_attribution: Float[Tensor, " d_sae"]
    """−d_iᵀ M d_i: mean over pairs of δ_i(C+) − δ_i(C−); positive supports the behaviour."""
    delta_activation: Float[Tensor, " d_sae"] | None
    """Mean latent activation on positive minus negative completion tokens (None if skipped)."""
    moment_matrix: Float[Tensor, "d_model d_model"]
    """M = mean over pairs of (M_{C+} − M_{C−}), with ā subtracted."""
    a_bar: Float[Tensor, " d_model"]
    """The mean activation used."""
    abar_source: str
    """Where ā came from: sae, dataset or zero."""

    def top(self, k: int) -> list[int]:
        """Latent indices with the largest Δ-attribution, best first."""
        k = min(k, self.delta_attribution.shape[0])
        return self.delta_attribution.topk(k).indices.tolist()


@dataclass
class AttributionResult:
    """The result of :func:`attribute`: one :class:`LayerAttribution` per layer plus counts."""

    layers: dict[int, LayerAttribution]
    n_completions: int
    """Completions that take part in at least one pair."""
    n_pairs: int
    n_prompts: int
    """Prompts that yielded at least one pair."""
    n_tokens: int
    """Non-padding tokens processed (prompt + completion)."""
    n_completion_tokens: int
    skipped_prompts: dict[str, str]
    completion_losses: list[float]
    """ℓ_C of each used completion, in dataset order of the used completions."""


