"""The package is a house with floors: a module imports only from its own subpackage or from
a lower floor, and no module imports itself back through others. Read from the source (every
import statement: module level, inside functions and under TYPE_CHECKING)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "latentaudit"

LAYERS = [
    ["errors"],
    ["_io", "_progress", "batching", "logistic", "options"],
    ["executor"],
    ["data"],
    ["suites"],
    ["runfolder"],
    ["models"],
    ["saes", "finetune"],
    ["generate"],
    ["sample"],
    ["judges"],
    ["pair"],
    ["attribution"],
    ["explain", "monitor"],
    ["circuit", "steer"],
    ["distributed"],
    ["report"],
    ["pipeline"],
    ["cli"],
    ["__main__"],
]
"""Lowest floor first. Units on one floor do not import each other; the package root
(``latentaudit``, which defines ``__version__`` and re-exports lazily) stands apart."""
RANK = {unit: n for n, floor in enumerate(LAYERS) for unit in floor}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every latentaudit module ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + is_pkg]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out |= subs or {target}
    return {m for m in out if m == "latentaudit" or m.startswith("latentaudit.")}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) for name, path in mods.items()}


def test_every_unit_has_a_floor():
    missing = {unit(m) for m in modules()} - set(RANK) - {""}
    assert not missing, f"add {sorted(missing)} to LAYERS"


def test_imports_go_down_the_floors():
    wrong = []
    for src, targets in graph().items():
        for dst in targets:
            a, b = unit(src), unit(dst)
            if a == b or a == "" or (b == "" and dst == "latentaudit"):
                continue  # inside a unit, the root's lazy exports, or its __version__
            if RANK[b] >= RANK[a]:
                wrong.append(f"{src} imports {dst}")
    assert not wrong, "imports from a higher or the same floor:\n" + "\n".join(sorted(wrong))


def test_the_root_is_imported_only_for_its_version():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "latentaudit" and not node.level:
                names = {a.name for a in node.names}
                assert names <= {"__version__"} | {unit(m) for m in modules()}, (name, names)


def test_no_module_imports_itself_back():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if n not in g:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_stages_do_not_import_the_engines():
    stages = {"attribution", "explain", "monitor", "circuit", "steer", "judges", "sample",
              "generate"}
    for src, targets in graph().items():
        if unit(src) in stages:
            assert not [t for t in targets if unit(t) == "distributed"], src
