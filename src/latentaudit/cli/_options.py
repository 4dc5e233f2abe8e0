"""Command-line options generated from a stage's config dataclass (standard library only).

An option is written once, as a field of its stage's config dataclass: its name, type, default,
docstring and (in ``metadata={"choices": ...}``) its allowed values. This module turns fields into
``add_argument`` calls and the parsed flags back into the dataclass, so that adding a field adds
its flag.

1. :func:`config_fields` reads the dataclass from its source file with :mod:`ast` (importing a
   stage's config imports torch, and ``--help`` must stay fast): each field's annotation, literal
   default, docstring and choices (a module constant, followed one ``from ... import`` deep).
2. :meth:`Config.add` adds one flag per field (:func:`latentaudit.options.flag` names it):
   ``int``/``float`` fields parse as such, ``tuple[T, ...]`` fields as comma-separated lists, a
   ``bool`` field that defaults to False is a switch and one that defaults to True is a
   ``--no-NAME`` switch. A command states only where its flag differs (:class:`Flag`).
3. :meth:`Config.build` makes the dataclass from the parsed flags, inverting ``--no-NAME``
   switches and applying each flag's conversion.

A command declares ``CONFIG = Config("latentaudit.steer.config", "SteerConfig", batch_size=Flag(
type=batch_size_arg))``, calls ``CONFIG.add(parser)`` and later ``CONFIG.build(args)``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from latentaudit.options import flag

PACKAGE = Path(__file__).parents[1]


@dataclass(frozen=True)
class Field:
    """A config field as its source file states it."""

    name: str
    annotation: str
    default: Any
    doc: str
    choices: tuple | None = None


@dataclass(frozen=True)
class Flag:
    """Where a field's flag differs from what its dataclass field says."""

    type: Callable[[str], Any] | None = None
    help: str | None = None
    """Replaces the field's docstring."""
    suffix: str = ""
    """Appended to the field's docstring."""
    metavar: str | None = None
    nargs: str | None = None
    """With ``nargs`` the flag takes a list, one item a word."""
    extend: bool = False
    """The flag may repeat, each time adding to the list (``action="extend"``)."""
    convert: Callable[[Any], Any] | None = None
    """Turns the parsed value into the field's value."""


def comma_floats(text: str) -> tuple[float, ...]:
    """``0.5,1`` → ``(0.5, 1.0)``."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def comma_ints(text: str) -> list[int]:
    """``12,87`` → ``[12, 87]``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated latent ids, got {text!r}") \
            from None


def comma_names(text: str) -> tuple[str, ...]:
    """``a, b`` → ``("a", "b")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


TYPES: dict[str, Callable[[str], Any] | None] = {
    "int": int, "float": float, "str": None,
    "tuple[str, ...]": comma_names, "tuple[float, ...]": comma_floats,
    "tuple[int, ...]": lambda text: tuple(comma_ints(text)),
}
"""The parser of each field annotation a flag supports (``X | None`` parses as ``X``)."""


def negated(f: Field) -> bool:
    """A bool field that defaults to True: its flag is ``--no-NAME``."""
    return f.annotation == "bool" and f.default is True


def dest(f: Field) -> str:
    """The attribute of the parsed arguments that holds the field's flag."""
    return "no_" + f.name if negated(f) else f.name


class Config:
    """The flags of a stage's config dataclass ``name`` in ``module`` (e.g.
    ``latentaudit.steer.config``); ``flags`` say where a field's flag differs from the field."""

    def __init__(self, module: str, name: str, **flags: Flag) -> None:
        self.module, self.name, self.flags = module, name, flags

    @property
    def source(self) -> str:
        """The module's file inside the package, e.g. ``steer/config.py``."""
        return "/".join(self.module.split(".")[1:]) + ".py"

    @property
    def fields(self) -> dict[str, Field]:
        return config_fields(self.source, self.name)

    def add(self, p: argparse.ArgumentParser, *names: str, skip: tuple[str, ...] = ()) -> None:
        """Add the flags of fields ``names`` in that order (none: every field not yet added and
        not in ``skip``, in the dataclass's order)."""
        fields = self.fields
        unknown = (set(names) | set(skip) | set(self.flags)) - set(fields)
        if unknown:
            raise ValueError(f"{self.name} has no field {', '.join(sorted(unknown))}")
        taken = {a.dest for a in p._actions}
        chosen = names or [n for n, f in fields.items() if n not in skip and dest(f) not in taken]
        for name in chosen:
            _add(p, fields[name], self.flags.get(name, Flag()))

    def build(self, args: argparse.Namespace):
        """The dataclass the parsed flags ask for; a field without a flag keeps its default."""
        values = {}
        for name, f in self.fields.items():
            if not hasattr(args, dest(f)):
                continue
            value = getattr(args, dest(f))
            if negated(f):
                value = not value
            convert = self.flags[name].convert if name in self.flags else None
            values[name] = convert(value) if convert is not None else value
        return getattr(importlib.import_module(self.module), self.name)(**values)


def _add(p: argparse.ArgumentParser, f: Field, how: Flag) -> None:
    text = (how.help if how.help is not None else f.doc) + how.suffix
    if f.annotation == "bool":
        name = "--no-" + flag(f.name)[2:] if negated(f) else flag(f.name)
        p.add_argument(name, dest=dest(f), action="store_true", help=text)
        return
    kind = f.annotation.removesuffix(" | None")
    if kind not in TYPES:
        raise ValueError(f"field {f.name}: no flag for the annotation {f.annotation!r}")
    extra: dict[str, Any] = {"type": how.type or TYPES[kind], "default": f.default}
    if how.nargs is not None:  # one value per word: the parser of the tuple's items
        item = kind.removeprefix("tuple[").removesuffix(", ...]")
        extra.update(nargs=how.nargs, default=list(f.default), type=how.type or TYPES[item])
        if how.extend:
            extra["action"] = "extend"
    if f.choices is not None:
        extra["choices"] = list(f.choices)
    if how.metavar is not None:
        extra["metavar"] = how.metavar
    if extra["type"] is None:
        del extra["type"]
    p.add_argument(flag(f.name), help=text, **extra)


# -- reading the dataclass from its source ---------------------------------------------------

def class_fields(source: str, cls: str) -> tuple[ast.Module, list[tuple[ast.AnnAssign, str]]]:
    """The parsed ``source`` (a path inside the package) and each annotated field of its class
    ``cls`` with its docstring (one line; empty when it has none)."""
    tree = ast.parse(PACKAGE.joinpath(source).read_text(encoding="utf-8"))
    body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = []
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(
                nxt.value, ast.Constant) and isinstance(nxt.value.value, str) else ""
            out.append((node, " ".join(doc.split())))
    return tree, out


@cache
def config_fields(source: str, cls: str) -> dict[str, Field]:
    """The fields of dataclass ``cls`` in ``source`` (a path inside the package), in order."""
    tree, fields = class_fields(source, cls)
    out = {}
    for node, doc in fields:
        default, choices = _default(node.value, tree, source)
        out[node.target.id] = Field(node.target.id, ast.unparse(node.annotation), default, doc,
                                    choices)
    return out


def _default(value: ast.expr | None, tree: ast.Module, source: str) -> tuple[Any, tuple | None]:
    """The literal default of a field and its choices (``field(default=..., metadata=...)``)."""
    if value is None:
        return None, None
    if not (isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field"):
        return ast.literal_eval(value), None
    kw = {k.arg: k.value for k in value.keywords}
    default = ast.literal_eval(kw["default"]) if "default" in kw else None
    choices = None
    if isinstance(kw.get("metadata"), ast.Dict):
        for k, v in zip(kw["metadata"].keys, kw["metadata"].values, strict=True):
            if isinstance(k, ast.Constant) and k.value == "choices":
                choices = tuple(_constant(v, tree, source))
    return default, choices


def _constant(node: ast.expr, tree: ast.Module, source: str) -> Any:
    """A literal, or a module constant bound to one here or in a module this one imports from."""
    if not isinstance(node, ast.Name):
        return ast.literal_eval(node)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == node.id
                                                for t in stmt.targets):
            return _constant(stmt.value, tree, source)
        if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith(
                "latentaudit.") and any((a.asname or a.name) == node.id for a in stmt.names):
            other = Config(stmt.module, "").source
            if not PACKAGE.joinpath(other).is_file():
                other = other.removesuffix(".py") + "/__init__.py"
            name = next(a.name for a in stmt.names if (a.asname or a.name) == node.id)
            mod = ast.parse(PACKAGE.joinpath(other).read_text(encoding="utf-8"))
            return _constant(ast.Name(name), mod, other)
    raise ValueError(f"{source}: {node.id} is not a constant of the module")
