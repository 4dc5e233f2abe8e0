"""The explain stage's inputs and intermediate results, shared by its driver
(:mod:`.engine`) and its writer (:mod:`.output`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from latentaudit.explain.exact import ExactChange, ExactCheck
from latentaudit.explain.maps import CompletionMap
from latentaudit.runfolder import RunFolder
from latentaudit.saes.sae import SAE


@dataclass
class Inputs:
    """Everything explain needs that does not depend on the model."""

    run: RunFolder
    chosen: dict[int, list[int]]
    """{layer: latents explained}, in ranking order (or as given)."""
    scored: dict[int, list[int]]
    """{layer: latents whose exact effect is measured}: the explained ones and the top
    ``rescore`` (or ``exact_top``) of the ranking."""
    saes: dict[int, SAE]
    data: list | None
    """The run's completions (None when neither maps nor the exact check need them)."""
    pairs: list[tuple[int, int]]
    """The sampled pairs, in sampled order (maps use them all, the exact check the first
    ``exact_pairs``)."""
    keys: dict[int, str]
    """{layer: cache key of the examples pass}."""
    model_name: str
    given: bool
    """Whether the latents were given (else the top of the ranking)."""



class LayerExact(NamedTuple):
    """The exact check of one layer."""

    check: ExactCheck
    change: ExactChange
    completions: list[int]
    """Dataset indices of the completions measured (rows of ``change``)."""
    pairs: list[tuple[int, int]]
    """The sampled pairs, as dataset indices."""


@dataclass
class Maps:
    """Per-token maps of the sampled completions (steps of :mod:`.maps`)."""

    rows: list[int]
    """Dataset indices of the mapped completions, in map order."""
    pairs: list[tuple[int, int]]
    """The sampled pairs whose completions are mapped (dataset indices)."""
    maps: list[CompletionMap]
    columns: dict[int, list[int]]
    """{layer: latents}, the order of each layer's δ columns."""
