"""Options of ``latentaudit finetune`` (one dataclass; field docstrings are the ``--help`` text)."""

from __future__ import annotations

from dataclasses import dataclass

from latentaudit.options import OptionError, at_least, whole


@dataclass
class FinetuneConfig:
    """LoRA supervised fine-tuning of a causal LM on chat JSONL (loss on assistant tokens)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout (0: none, and the run is deterministic given the seed)."""
    target_modules: str = "all-linear"
    """Modules that get an adapter: all-linear, or comma-separated module names (q_proj,v_proj)."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear warm-up steps; then a linear decay to 0 at the last step."""
    epochs: int = 1
    """Passes over the data."""
    batch_size: int = 8
    """Conversations per optimizer step."""
    max_length: int = 512
    """Tokens kept per conversation (cut on the right)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0: no clipping)."""
    seed: int = 0
    """Seed of the data order and the adapter's initialisation."""
    checkpoint_every: int = 25
    """Save a checkpoint every N steps (a killed run resumes from the last one)."""

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "max_length", "checkpoint_every"):
            whole(name, getattr(self, name), 1)
        whole("warmup_steps", self.warmup_steps, 0)
        for name in ("weight_decay", "grad_clip", "dropout"):
            at_least(name, getattr(self, name), 0)
        for name in ("alpha", "lr"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) > 0:
                raise OptionError(name, f"{{}} must be > 0, got {getattr(self, name)!r}.")
        if self.dropout >= 1:
            raise OptionError("dropout", f"{{}} must be below 1, got {self.dropout!r}.")
        if not self.modules():
            raise OptionError("target_modules", "{} is empty: write all-linear or module names.")

    def modules(self) -> str | list[str]:
        """What peft's ``target_modules`` gets."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]
