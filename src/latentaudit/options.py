"""Checks of option values, written once; an error names the field it is about.

A config dataclass's ``__post_init__`` calls :func:`whole`, :func:`at_least` and :func:`one_of`
with the field's name. The :class:`OptionError` they raise reads with the command-line flag
(:func:`flag`: ``top_k`` → ``--top-k``, the one place that turns a field into its flag) and
keeps the field, so a run config reports it under its own key (:meth:`OptionError.named`).
Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latentaudit.errors import LatentAuditError


def flag(field: str) -> str:
    """The command-line flag of a config field."""
    return "--" + field.replace("_", "-")


class OptionError(LatentAuditError):
    """A bad value of config field ``field``; ``text`` has ``{}`` where the option is named."""

    def __init__(self, field: str, text: str) -> None:
        self.field, self.text = field, text
        super().__init__(text.format(flag(field)))

    def named(self, name: str) -> str:
        """The message with the option called ``name`` (e.g. a config file's key)."""
        return self.text.format(name)


def whole(field: str, value: Any, low: int | None = None) -> None:
    """``value`` is an int (not a bool), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" ≥ {low}" if low is not None else ""
        raise OptionError(field, f"{{}} must be a whole number{bound}, got {value!r}.")


def at_least(field: str, value: Any, low: float) -> None:
    """``value`` is a number (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise OptionError(field, f"{{}} must be at least {low:g}, got {value!r}.")


def one_of(field: str, value: Any, allowed: Sequence[str]) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise OptionError(field, f"{{}} '{value}' is not one of {', '.join(allowed)}.")
