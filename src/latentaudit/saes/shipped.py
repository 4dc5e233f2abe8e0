"""SAEs shipped with latentaudit for its embedded models (``--sae default``).

Each lives in ``latentaudit/saes/shipped/<name>/`` in latentaudit's own format (cfg.json +
sae.safetensors, with ā) next to a ``CARD.md`` saying how it was trained. The folder named after
a model's short name is its default SAE (``--sae default``); others are chosen by folder name
(e.g. ``--sae qwen2.5-0.5b-instruct-l12-4k``).
"""

from __future__ import annotations

from pathlib import Path

from latentaudit.errors import LatentAuditError

SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_names() -> list[str]:
    """Folder names of every shipped SAE."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "cfg.json").is_file())


def shipped_models() -> list[str]:
    """Short names of the models that have a default shipped SAE."""
    from latentaudit.models.embedded import EMBEDDED

    return [name for name in shipped_names() if name in EMBEDDED]


def default_sae_path(model: str) -> Path:
    """The shipped SAE folder for an embedded model (for a LoRA adapter or a shipped organism:
    its base model's, which reads the adapted residual stream), or a clear error."""
    from latentaudit.models.embedded import canonical

    path = SHIPPED_DIR / canonical(model)
    if not (path / "cfg.json").is_file():
        base = _adapter_base(model)
        if base is not None and base != model:
            return default_sae_path(base)
        have = ", ".join(shipped_models()) or "none"
        raise LatentAuditError(
            f"--sae default: latentaudit ships no SAE for model '{model}' (shipped: {have}); "
            "pass an SAE path, or train one with `latentaudit train-sae`.")
    return path


def _adapter_base(model: str) -> str | None:
    """The base model when ``model`` names a LoRA adapter, else None."""
    from latentaudit.models.adapters import parse_model_spec

    try:
        spec = parse_model_spec(model)
    except LatentAuditError:
        return None
    return spec.base if spec.adapter is not None else None


def resolve_shipped(value: str, model: str) -> str:
    """``default`` (the model's default shipped SAE) or a shipped SAE's name as its folder;
    anything else unchanged."""
    if value == "default":
        return str(default_sae_path(model))
    if value in shipped_names() and not Path(value).exists():
        return str(SHIPPED_DIR / value)
    return value


def resolve_sae_path(value: str, model: str) -> str:
    """An ``--sae`` value as a path: ``default`` or a shipped SAE's name
    (:func:`resolve_shipped`), a public name (``org/repo/sub/folder``, ``org/repo:hookpoint``,
    ``saelens:RELEASE/ID``; fetched into the hub cache, see :mod:`latentaudit.saes.hub`), or a
    path (returned unchanged)."""
    shipped = resolve_shipped(value, model)
    if shipped != value:
        return shipped
    from latentaudit.saes import hub

    ref = hub.parse(value)
    return str(hub.fetch(ref)) if ref is not None else value
