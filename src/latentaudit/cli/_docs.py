"""Field docstrings of config dataclasses, read from source so ``--help`` never imports torch."""

from __future__ import annotations

import ast
import functools
from pathlib import Path


@functools.lru_cache(maxsize=8)
def field_docs(module: str, cls: str) -> dict[str, str]:
    """{field: its docstring, whitespace folded} of dataclass ``cls`` in ``module``.

    ``module`` is a dotted name inside this package (``latentaudit.sample``); its file is found
    next to this one, since importing it, or even locating it through importlib, would import
    its parent packages (and torch with them).
    """
    parts = module.split(".")[1:]
    base = Path(__file__).parents[1].joinpath(*parts)
    source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
