"""Sparse autoencoders: one canonical class, loaders for the common formats, training."""

from latentaudit.saes.sae import SAE, SAEInfo

__all__ = ["SAE", "SAEInfo", "load_sae"]


def load_sae(path, **kwargs):
    """Load an SAE from any supported format (see :mod:`latentaudit.saes.formats`)."""
    from latentaudit.saes.formats import load_sae as _load

    return _load(path, **kwargs)
