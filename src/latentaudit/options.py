"""Checks of option values, written once; an error names the field it is about.

A config dataclass's ``__post_init__`` calls :func:`whole`, :func:`at_least` and :func:`one_of`
with the field's name, or raises an :class:`OptionError` whose text has ``{}`` where its field
is named (``{other_field}`` where another field is). Library code names fields, never flags:
the error reads with the command-line flags (:func:`flag`: ``top_k`` → ``--top-k``, the one
place that turns a field into its flag) and keeps its text, so a run config reports it with its
own keys (:meth:`OptionError.named` with :func:`config_key`). Code that checks an option outside a
dataclass takes the naming as a parameter (``name=flag`` by default). Standard library only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from latentaudit.errors import LatentAuditError

Naming = Callable[[str], str]
"""How an error names a config field: :func:`flag` on the command line, :func:`config_key` in a run
config."""

_SLOT = re.compile(r"\{([a-z_]*)\}")


def flag(field: str) -> str:
    """The command-line flag of a config field."""
    return "--" + field.replace("_", "-")


def config_key(field: str) -> str:
    """The run-config key of a config field: the field's own name."""
    return field


class OptionError(LatentAuditError):
    """A bad value of config field ``field``; ``text`` has ``{}`` where the field is named and
    ``{name}`` where another field ``name`` is (e.g. ``"{} must leave two positions of
    {context_len} 8."``)."""

    def __init__(self, field: str, text: str) -> None:
        self.field, self.text = field, text
        super().__init__(self.named(flag))

    def named(self, name: Naming) -> str:
        """The message with each field called ``name(field)`` (e.g. :func:`config_key`)."""
        return _SLOT.sub(lambda m: name(m.group(1) or self.field), self.text)


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


def check_choices(config: Any) -> None:
    """Each field of dataclass ``config`` declared ``field(..., metadata={"choices": C})`` (a
    module constant, which the command line reads too) holds one of ``C``."""
    for f in dataclasses.fields(config):
        if "choices" in f.metadata:
            one_of(f.name, getattr(config, f.name), f.metadata["choices"])
