"""User-facing errors.

Every problem a user can fix (a bad file, a wrong flag, a missing package) raises
:class:`LatentAuditError` with one sentence that names the file, line, field or flag and says what
to do. The CLI prints that sentence without a traceback; library callers can catch it.
"""

from __future__ import annotations


class LatentAuditError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


class ShapeMismatchError(LatentAuditError):
    """An SAE does not fit a model (d_model or layer), or a tensor in a file has the wrong shape."""


class MissingPackageError(LatentAuditError):
    """An optional package is needed for this step; the message says what to install."""


def require(module: str, install: str, purpose: str):
    """Import ``module`` or raise a :class:`MissingPackageError` that says how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(
            f"{purpose} needs the Python package '{module}': install it with `{install}`."
        ) from err
