"""Options of ``latentaudit judge`` and of an OpenAI-compatible judge (field docstrings are the
``--help`` text; standard library only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JudgeConfig:
    """What ``latentaudit judge`` grades, with which judge, and where it writes."""

    completions: str | None = None
    """Completions JSONL (from `latentaudit sample`)."""
    rubric: str | None = None
    """Shipped rubric name (see --list-rubrics) or a rubric JSON file (an edited copy from
    --copy-rubric)."""
    judge: str = "auto"
    """rules[:FILE], openai:MODEL, local:MODEL, human:LABELS_FILE or probe[:FILE]; auto
    (default): the rubric's shipped probe when it has one, else its rules."""
    out: str | None = None
    """Output judged JSONL."""
    cache: str | None = None
    """Verdict cache (default: judge_cache.jsonl next to --out)."""
    judge_model: str | None = None
    """probe judge: the local model to read (default: the one it was trained on), e.g. another
    folder holding the same model."""
    device: str = "auto"
    """local / probe judge: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """local / probe judge: float32 or bfloat16."""
    batch_size: int | None = None
    """local / probe judge: sequences per forward pass (default 16 / 8)."""
    export_labels: str | None = None
    """Write the completions to FILE (.csv or .jsonl) for human labelling and stop."""
    list_rubrics: bool = False
    """List shipped rubrics and stop."""
    copy_rubric: str | None = None
    """Copy --rubric's files (JSON, templates, rules) into DIR for editing and stop."""


@dataclass
class ApiOptions:
    """An OpenAI-compatible judge's endpoint and requests (every command that judges)."""

    judge_base_url: str = "https://api.openai.com/v1"
    """Base URL of the OpenAI-compatible endpoint (openai judge)."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (never written anywhere)."""
    judge_workers: int = 8
    """Concurrent requests."""
    judge_timeout: float = 60.0
    """Seconds per request."""
    judge_retries: int = 5
    """Retries on 429 / 5xx / timeouts, with exponential backoff."""
    no_logprobs: bool = False
    """Do not ask the endpoint for logprobs (read the text answer only)."""

    def __post_init__(self) -> None:
        from latentaudit.options import at_least

        for name, low in (("judge_workers", 1), ("judge_retries", 0), ("judge_timeout", 1e-9)):
            at_least(name, getattr(self, name), low)
