"""The ``latentaudit`` command line.

Each subcommand lives in its own module in this package and defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Modules import only the standard library at
import time (torch and transformers load inside ``run``), so ``--help`` stays fast. A
:class:`~latentaudit.errors.LatentAuditError` is printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

# Order in which subcommands are listed in --help (pipeline order); others follow, sorted.
ORDER = ["models", "data", "train-sae", "sae", "sample", "judge", "pair", "attribute", "explain",
         "steer", "report", "demo"]


def _command_modules() -> list:
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(mods, key=lambda m: (rank.get(m.NAME, len(ORDER)), m.NAME))


def build_parser() -> argparse.ArgumentParser:
    from latentaudit import __version__

    parser = argparse.ArgumentParser(
        prog="latentaudit",
        description="Find the sparse-autoencoder latents that cause a model's bad completions.")
    parser.add_argument("--version", action="version", version=f"latentaudit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP,
                           description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from latentaudit.errors import LatentAuditError

    try:
        return int(args._run(args) or 0)
    except LatentAuditError as err:
        print(f"latentaudit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latentaudit {args.command}: interrupted; finished work is kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
