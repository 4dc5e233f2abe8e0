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
from functools import cache

# Order in which subcommands are listed in --help (pipeline order); others follow, sorted.
ORDER = ["models", "data", "train-sae", "sae", "sample", "judge", "pair", "attribute", "monitor",
         "explain", "circuit", "steer", "report", "demo"]


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


@cache
def field_docs(source: str, cls: str) -> dict[str, str]:
    """Field docstrings of dataclass ``cls`` in ``source`` (a path inside the package, e.g.
    ``attribution/config.py``), read from the file so that ``--help`` imports no torch."""
    from latentaudit.cli._options import class_fields

    return {node.target.id: doc for node, doc in class_fields(source, cls)[1] if doc}


DEVICE_HELP = ("auto, auto-map (spread a model too large for one GPU over every GPU), cpu, cuda, "
               "cuda:N or mps.")


def batch_size_arg(text: str) -> int:
    """``--batch-size``: a whole number ≥ 1, or auto (0: chosen from free device memory)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1 or auto, got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not when the help already names
    it, and not for None, False or an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], ()) or \
                action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


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
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        add_adapter_flags(p)
        p.set_defaults(_run=mod.run)
    return parser


ADAPTER_HELP = ("A LoRA adapter (a PEFT folder or hub id) applied to --model, as --model "
                "BASE+ADAPTER would.")


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """``--adapter`` beside every ``--model`` (sub-subcommands included)."""
    options = {o for a in parser._actions for o in a.option_strings}
    if "--model" in options and "--adapter" not in options:
        parser.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                add_adapter_flags(sub)


def apply_adapter_flag(args: argparse.Namespace) -> None:
    """``--model BASE --adapter DIR`` becomes the model name ``BASE+DIR``."""
    from latentaudit.errors import LatentAuditError

    adapter = getattr(args, "adapter", None)
    if adapter is None:
        return
    if not getattr(args, "model", None):
        raise LatentAuditError("--adapter needs --model BASE (the model the adapter applies to).")
    args.model = f"{args.model}+{adapter}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from latentaudit._progress import BarSafeHandler
    from latentaudit.errors import LatentAuditError

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[BarSafeHandler()])
    try:
        apply_adapter_flag(args)
        return int(args._run(args) or 0)
    except LatentAuditError as err:
        _fail(f"latentaudit {args.command}: error: {err}")
        return 2
    except KeyboardInterrupt:
        _fail(f"latentaudit {args.command}: interrupted; finished work is kept.")
        return 130


def _fail(message: str) -> None:
    """Print ``message`` on stderr on a line of its own, below any progress bar left open."""
    from latentaudit._progress import close_bars

    close_bars()
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
