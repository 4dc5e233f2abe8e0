"""The option classes of the pipeline's own keys: the top level of a run config, and the
[judge], [pair] and [steer] keys that are not a stage dataclass's fields. Field docstrings
document each key (as the stage dataclasses' do for theirs)."""

from __future__ import annotations

from dataclasses import dataclass

from latentaudit.errors import LatentAuditError
from latentaudit.options import at_least


@dataclass
class RunSettings:
    """The top-level keys of a run config."""

    model: str
    """Model: an embedded short name, a local folder or a hub id."""
    sae: str = "default"
    """SAE path (any supported format), a shipped SAE's name, or default (the model's)."""
    layer: int | None = None
    """0-indexed layer the SAE reads (default: the layer its config records)."""
    out: str | None = None
    """The run folder (relative to the config file); `latentaudit run --out` wins over it."""
    prompts: str | None = None
    """Prompts to sample from: a suite name, a JSONL or .txt file. Steering uses them too (minus
    the prompts attribution saw) unless [steer] prompts is set."""
    completions: str | None = None
    """Start from these completions (JSONL as written by `latentaudit sample`): no sampling."""
    judged: str | None = None
    """Start from these judged completions (from `latentaudit judge`): no sampling or judging."""
    dataset: str | None = None
    """Start from this behaviour dataset (JSONL): no sampling, judging or pairing."""
    rubric: str = "false-belief"
    """Rubric of the judge, the pair stage and steering: a shipped name or a rubric JSON file."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps (not part of any fingerprint)."""
    dtype: str = "float32"
    """Model dtype: float32 or bfloat16."""
    notes: tuple[str, ...] = ()
    """Lines about this run for the report (e.g. why its sizes are small)."""


@dataclass
class JudgeOptions:
    """The [judge] section: the options of `latentaudit judge`."""

    judge: str = "auto"
    """rules[:FILE], probe[:FILE], local:MODEL, openai:MODEL, human:LABELS or auto (the rubric's
    shipped probe when it has one, else its rules)."""
    judge_model: str | None = None
    """probe judge: the local model it reads (default: the one it was trained on)."""
    batch_size: int | None = None
    """local / probe judge: sequences per forward pass (default 16 / 8)."""
    judge_base_url: str = "https://api.openai.com/v1"
    """openai judge: base URL of the OpenAI-compatible endpoint."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """openai judge: the environment variable holding the API key (never written anywhere)."""
    judge_workers: int = 8
    """openai judge: concurrent requests."""
    judge_timeout: float = 60.0
    """openai judge: seconds per request."""
    judge_retries: int = 5
    """openai judge: retries on 429 / 5xx / timeouts."""
    no_logprobs: bool = False
    """openai judge: read the text answer only."""
    allow_failures: bool = False
    """Go on when some completions could not be graded (they are left out); by default the run
    stops so that a rerun can retry them."""

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("judge_workers", 1), ("judge_retries", 0),
                          ("judge_timeout", 1e-9)):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), low)


@dataclass
class PairOptions:
    """The [pair] section."""

    pairing: str = "all"
    """Pairs counted within a prompt: all (every positive×negative) or matched (one-to-one);
    attribution pairs by [attribute] pairing."""

    def __post_init__(self) -> None:
        if self.pairing not in ("all", "matched"):
            raise LatentAuditError(f"--pairing '{self.pairing}' is not one of all, matched.")


@dataclass
class SteerOptions:
    """The [steer] keys besides :class:`~latentaudit.steer.SteerConfig`'s."""

    judge: str | None = None
    """Judge of the steered completions (default: the [judge] section's)."""
    coherence_judge: str = "rules"
    """Judge of the rubric's 'coherent' question when the judge does not answer it (none: no
    incoherence measure)."""
    prompts: str | None = None
    """Prompts to steer on (default: the run's prompts, else the suite named like the rubric);
    the prompts attribution saw are left out."""
    latents: tuple[int, ...] = ()
    """Also steer these latent ids (the 'given' set)."""
    toward_model: str | None = None
    """Steer toward the behaviour on this model instead."""
    base_model: str | None = None
    """Base model of the model-diffing baseline (methods = [..., "model-diff"])."""


@dataclass
class CircuitOptions:
    """The [circuit] keys besides :class:`~latentaudit.circuit.CircuitConfig`'s."""

    upstream_sae: tuple[str, ...] = ()
    """SAEs of earlier layers (paths or shipped SAE names): one for a two-layer circuit, several
    for a chain down the layers."""
    upstream_layer: int | tuple[int, ...] | None = None
    """The layer of each upstream SAE (default: the layer each SAE records)."""
