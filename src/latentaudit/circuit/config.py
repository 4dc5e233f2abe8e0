"""Options and result types of the circuit stage (field docstrings double as ``--help`` text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor

from latentaudit.options import OptionError, at_least, check_choices

MEASURES = ("loss", "pre-activation")
ROUTES = ("auto", "stacked", "one-at-a-time")
ABAR_SOURCES = ("auto", "sae", "dataset", "zero")


@dataclass
class CircuitConfig:
    """Options of the circuit stage."""

    top_k: int = 10
    """Targets per layer: the top of the run's ranking at the target layer (unless targets are
    given), then the upstream latents with the most kept edge weight at each hop down a chain."""
    measure: str = field(default="loss", metadata={"choices": MEASURES})
    """What an edge changes: loss (the target's contribution to the completion's loss, so that an
    edge is in δ's units) or pre-activation (the target's SAE encoder pre-activation summed over
    the completion's tokens)."""
    fraction: float = 0.8
    """Keep, per target, the strongest incoming edges that hold this share of its total absolute
    attribution."""
    max_edges: int = 10
    """At most this many incoming edges per target (0: no cap)."""
    abar: str = field(default="auto", metadata={"choices": ABAR_SOURCES})
    """Mean activation ā at the upstream layers: sae (stored with the SAE), dataset (mean over the
    dataset's own tokens), zero, or auto (sae when the SAE stores one, else dataset)."""
    batch_size: int = 8
    """Completions per forward/backward pass."""
    target_batch: int = 4
    """Targets whose vector-Jacobian products are stacked in the batch dimension of one pass."""
    route: str = field(default="auto", metadata={"choices": ROUTES})
    """stacked: one backward for a stack of targets through a replay of the layers between the
    two SAEs (checked against the clean activations; falls back by itself); one-at-a-time: one
    backward per target through the clean pass (the reference); auto: stacked on an accelerator,
    one-at-a-time on the CPU, where stacking gains no parallelism and the replay's forward is
    extra work (measured: 37 s against 54 s a batch, 5 targets, Qwen2.5-0.5B, 2 cores)."""
    max_prompts: int = 0
    """Trace over the pairs of at most this many prompts of the run's dataset (the first ones in
    the file's order), for a quicker look at a large run; 0: every pair the run attributed. Each
    target costs one more backward between the two layers on top of a forward and backward like
    the attribution pass, so tracing costs more than attributing."""
    lens_tokens: int = 10
    """Logit-lens tokens kept per node."""
    examples: bool = False
    """Run the top-activating-examples pass of explain for layers whose SAE has no cached one
    (without it, nodes show examples only when the cache has them)."""
    node_examples: int = 3
    """Top-activating examples kept per node."""
    checkpoint_every_batches: int = 20
    """Save a resumable checkpoint every N batches (0: never by count)."""
    checkpoint_every_seconds: float = 300.0
    """Save a resumable checkpoint when S seconds have passed since the last one (0: never by
    time)."""

    def __post_init__(self) -> None:
        for name, low in (("top_k", 1), ("max_edges", 0), ("max_prompts", 0), ("batch_size", 1),
                          ("target_batch", 1), ("lens_tokens", 1), ("node_examples", 0),
                          ("checkpoint_every_batches", 0), ("checkpoint_every_seconds", 0)):
            at_least(name, getattr(self, name), low)
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0 < self.fraction <= 1:
            raise OptionError("fraction", f"{{}} must be in (0, 1], got {self.fraction!r}.")
        check_choices(self)


@dataclass
class Hop:
    """The edges from one upstream layer into the targets of the layer above it."""

    upstream_layer: int
    target_layer: int
    targets: list[int]
    """Target latents at ``target_layer``, in row order of ``edges``."""
    edges: Float[Tensor, "k d_sae"]
    """Δ-edge e_{j→i}: mean over pairs of e_{j→i}(C+) − e_{j→i}(C−), every upstream latent j."""
    keep: Bool[Tensor, "k d_sae"]
    """The edges pruning keeps."""
    total: list[float]
    """Per target, Σ_j |e_{j→i}| over every upstream latent."""
    kept: list[float]
    """Per target, Σ_j |e_{j→i}| over the kept edges."""
    upstream_delta: Float[Tensor, " d_sae"]
    """Δ-attribution of every upstream latent, from the same passes."""
    a_bar: Float[Tensor, " d_model"]
    abar_source: str
    route: str
    """How the vector-Jacobian products were taken: stacked or one-at-a-time."""
    upstream_sae: str
    """The upstream SAE's file."""
    upstream_hook: str = "resid_post"
    """The hook point of ``upstream_layer`` the upstream SAE reads (a¹ is taken there)."""
    target_hook: str = "resid_post"
    """The hook point of ``target_layer`` the targets' SAE reads (a² and g² are taken there)."""


@dataclass
class CircuitResult:
    """What :func:`~latentaudit.circuit.trace_circuit` computed, as written to ``out``."""

    hops: list[Hop]
    """From the run's layer downwards."""
    graph: dict[str, Any]
    """The content of circuit.json."""
    out: Path
    tensors: dict[str, Tensor] = field(default_factory=dict)
    """The arrays of circuit.safetensors."""

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.graph["nodes"]

    @property
    def edges(self) -> list[dict[str, Any]]:
        return self.graph["edges"]

