"""Configuration and result types of the attribution stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float
from torch import Tensor

from latentaudit.data.behaviour import PAIRINGS
from latentaudit.options import at_least, check_choices
from latentaudit.runfolder import RankingRow as RankedLatent
from latentaudit.saes.sae import SAEInfo

ABAR_SOURCES = ("auto", "sae", "dataset", "zero")
POSITIONS = ("all", "completion")
HOOKS = ("auto", "resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass
class AttributionConfig:
    """Options of the attribution stage."""

    batch_size: int = 8
    """Completions per forward/backward pass (0 or auto: chosen from free device memory)."""
    abar: str = field(default="auto", metadata={"choices": ABAR_SOURCES})
    """Mean activation ā for mean ablation: sae (stored with the SAE), dataset (mean over the
    dataset's own tokens), zero, or auto (sae when the SAE stores one, else dataset)."""
    positions: str = field(default="all", metadata={"choices": POSITIONS})
    """Positions t summed in δ_i(C): all (prompt and completion) or completion (only its tokens)."""
    pairing: str = field(default="all", metadata={"choices": PAIRINGS})
    """Pairs within a prompt: all (every positive×negative) or matched (one-to-one)."""
    top_k: int = 100
    """Latents in the ranking (per layer), with their logit-lens tokens."""
    delta_activation: bool = True
    """Also compute the Δ-activation baseline (one SAE encoder pass over completion tokens; the
    only SAE-side cost that grows with d_sae during the pass)."""
    sae_chunk: int = 0
    """Latents per chunk when the SAE is streamed to the device (0: the whole SAE on the
    device when it fits next to the model, else chunks sized from free memory). Does not change
    the result."""
    checkpoint_every_batches: int = 20
    """Save a resumable checkpoint every N batches (0: never by count)."""
    checkpoint_every_seconds: float = 300.0
    """Save a resumable checkpoint when S seconds have passed since the last one (0: never by
    time)."""
    hook: str = field(default="auto", metadata={"choices": HOOKS})
    """Hook point the SAEs read: auto (the one each SAE's config records; resid_post when it
    records none), resid_pre, attn_out, resid_mid, mlp_out or resid_post. An SAE that records
    another is an error."""

    def __post_init__(self) -> None:
        at_least("batch_size", self.batch_size, 0)
        check_choices(self)
        for name, low in (("top_k", 1), ("sae_chunk", 0), ("checkpoint_every_batches", 0),
                          ("checkpoint_every_seconds", 0)):
            at_least(name, getattr(self, name), low)


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
    sae: SAEInfo
    """The SAE read at this layer (its file, format, activation, k)."""

    def top(self, k: int) -> list[int]:
        """Latent indices with the largest Δ-attribution, best first."""
        k = min(k, self.delta_attribution.shape[0])
        return self.delta_attribution.topk(k).indices.tolist()


@dataclass
class ModelSummary:
    """The model an attribution ran on."""

    name: str
    """What the user asked for (short name, path or hub id)."""
    path: str
    """Where its weights were read from."""
    d_model: int
    dtype: str
    adapter: dict | None = None
    """The LoRA adapter merged into the weights (base, folder, sha256), if any."""


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
    ranking: list[RankedLatent]
    """The ``config.top_k`` best latents of each layer, layer by layer."""
    model: ModelSummary
    config: AttributionConfig
    dataset: dict[str, str] | None
    """``path`` and ``sha256`` of the dataset file (None when completions were given in code)."""
