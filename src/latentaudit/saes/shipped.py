"""SAEs shipped with latentaudit for its embedded models (``--sae default``).

Each lives in ``latentaudit/saes/shipped/<model short name>/`` in latentaudit's own format
(cfg.json + sae.safetensors, with ā) next to a ``CARD.md`` saying how it was trained.
"""

from __future__ import annotations

from pathlib import Path

from latentaudit.errors import LatentAuditError

SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_models() -> list[str]:
    """Short names of the models that have a shipped SAE."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "cfg.json").is_file())


def default_sae_path(model: str) -> Path:
    """The shipped SAE folder for an embedded model, or a clear error."""
    path = SHIPPED_DIR / model
    if not (path / "cfg.json").is_file():
        have = ", ".join(shipped_models()) or "none"
        raise LatentAuditError(
            f"--sae default: latentaudit ships no SAE for model '{model}' (shipped: {have}); "
            "pass an SAE path, or train one with `latentaudit train-sae`.")
    return path
