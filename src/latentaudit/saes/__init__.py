"""Sparse autoencoders: one canonical class, loaders for the common formats, training."""

from latentaudit.saes.sae import SAE, SAEInfo

__all__ = ["SAE", "SAEInfo", "load_sae"]


def load_sae(path, *, model: str | None = None, **kwargs):
    """Load an SAE from any supported format (see :mod:`latentaudit.saes.formats`).

    ``path`` takes every value ``--sae`` takes: a folder or file, ``"default"`` (the shipped
    SAE of ``model``, by default the default embedded model), a shipped SAE's name, or a public
    name (``org/repo/sub/folder``, ``org/repo:hookpoint``, ``saelens:RELEASE/ID``; ``revision=``
    pins a hub revision)."""
    from latentaudit.models.embedded import DEFAULT_MODEL
    from latentaudit.saes.formats import load_sae as _load
    from latentaudit.saes.shipped import resolve_shipped

    return _load(resolve_shipped(str(path), model or DEFAULT_MODEL), **kwargs)
