"""Options of the explain stage (field docstrings double as ``--help`` text)."""

from __future__ import annotations

from dataclasses import dataclass

from latentaudit.options import OptionError, at_least


@dataclass
class ExplainConfig:
    """Options of the explain stage."""

    top_k: int = 20
    """Latents explained per layer: the top of the run's ranking.jsonl (unless latents are
    given)."""
    examples: int = 20
    """Top-activating examples kept per latent."""
    corpus: str = "held-out"
    """Reference text for top-activating examples: held-out (the held-out split of the training
    mix), outside, a source of `latentaudit data fetch`, or a .txt / .jsonl file or folder."""
    corpus_tokens: int = 100_000
    """Token positions of the reference text read for examples and density."""
    context_len: int = 128
    """Tokens per packed reference sequence, BOS included."""
    skip_first: int = 1
    """Positions left out at the start of every reference sequence (BOS / attention sink)."""
    context_before: int = 16
    """Tokens shown before an example's activating token."""
    context_after: int = 4
    """Tokens shown after an example's activating token."""
    batch_size: int = 8
    """Sequences per forward pass (reference text and completions; 0 or auto: chosen from free
    device memory)."""
    lens_tokens: int = 10
    """Tokens in each logit-lens list (cosine, promoted, suppressed)."""
    through_final_norm: bool = False
    """Pass decoder directions through the model's final norm before the unembedding."""
    maps: bool = True
    """Per-token attribution maps on the completions of sampled pairs of the run."""
    map_pairs: int = 16
    """Pairs of the run whose completions get per-token attribution maps (0: every pair)."""
    exact_pairs: int = 8
    """Pairs on which the exact mean-ablation effect is measured (0: skip the check)."""
    exact_batch_size: int = 32
    """Latents ablated together in one batched pass of the layers above L."""
    rescore: int = 0
    """Re-rank the top K latents of each layer by their exact mean-ablation effect (0: off)."""
    seed: int = 0
    """Seed of the order in which pairs are sampled."""
    interpret_model: str | None = None
    """Model for one-line explanations through an OpenAI-compatible endpoint (off when unset)."""
    interpret_base_url: str = "https://api.openai.com/v1"
    """Base URL of the OpenAI-compatible endpoint for explanations."""
    interpret_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (never written anywhere)."""
    interpret_timeout: float = 60.0
    """Seconds per explanation request attempt."""

    def __post_init__(self) -> None:
        for name, low in (("top_k", 1), ("examples", 1), ("corpus_tokens", 1),
                          ("context_len", 2), ("skip_first", 0), ("context_before", 0),
                          ("context_after", 0), ("batch_size", 0), ("lens_tokens", 1),
                          ("map_pairs", 0), ("exact_pairs", 0), ("exact_batch_size", 1),
                          ("rescore", 0), ("interpret_timeout", 1e-9)):
            at_least(name, getattr(self, name), low)
        if self.skip_first >= self.context_len - 1:
            raise OptionError("skip_first", f"{{}} {self.skip_first} must leave at least two "
                                            f"positions of {{context_len}} {self.context_len}.")
        if self.rescore and not self.exact_pairs:
            raise OptionError("rescore", "{} needs the exact effect: give {exact_pairs} N "
                                         "(N > 0), or drop {}.")
        if self.interpret_model is not None and not self.interpret_base_url.startswith(
                ("http://", "https://")):
            raise OptionError("interpret_base_url", f"{{}} {self.interpret_base_url!r} must "
                                                    "start with http:// or https://.")
