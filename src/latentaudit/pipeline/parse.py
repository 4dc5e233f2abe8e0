"""Reading a run config file: TOML (``tomllib``, ``tomli`` before Python 3.11) or YAML (PyYAML),
with the line of every key, so that each problem can name ``file:line``.

TOML parsers give no positions, so the lines of ``[table]`` headers and ``key =`` lines are found
by a scan of the text (enough for the plain tables and keys a run config uses; a key the scan
cannot place is named by its dotted path instead). YAML keys carry their marks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError


class Located:
    """Where each key of a parsed file is: ``where(("steer", "top_k"))`` -> "run.toml:12"."""

    def __init__(self, path: Path, lines: dict[tuple[str, ...], int]):
        self.path, self.lines = path, lines

    def where(self, keys: tuple[str, ...]) -> str:
        name = ".".join(keys)
        line = self.lines.get(keys)
        return f"{self.path}:{line}: {name}" if line else f"{self.path}: key {name}"


_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def _toml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Lines of ``[table]`` headers and ``key =`` lines (tables and plain keys, as configs use)."""
    lines, table = {}, ()
    for n, line in enumerate(text.splitlines(), start=1):
        if m := _TABLE.match(line):
            table = tuple(m[1].split("."))
            lines.setdefault(table, n)
        elif m := _KEY.match(line):
            lines.setdefault((*table, m[1]), n)
    return lines


def _yaml_lines(node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    import yaml

    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            lines[path] = key.start_mark.line + 1
            lines.update(_yaml_lines(value, path))
    return lines


def parse_file(path: str | Path) -> tuple[dict[str, Any], Located]:
    """The mapping a .toml / .yaml / .yml file holds, and where each key is."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"{path}: no such config file; pass a .toml or .yaml run config.")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise LatentAuditError(f"{path}: not valid TOML: {err}.") from None
        return data, Located(path, _toml_lines(text))
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err)
            raise LatentAuditError(f"{where}: not valid YAML: {problem}.") from None
        if not isinstance(data, dict):
            raise LatentAuditError(f"{path}: the file must hold a mapping of keys (model: ..., "
                                   "sae: ..., [stage sections]).")
        return data, Located(path, _yaml_lines(node))
    raise LatentAuditError(f"{path}: a run config is a .toml, .yaml or .yml file.")
