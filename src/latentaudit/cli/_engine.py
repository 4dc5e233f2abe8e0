"""The ``--engine`` options every command that runs a model shares (standard library only)."""

from __future__ import annotations

import argparse

from latentaudit.cli._options import Config, Flag

CONFIG = Config("latentaudit.executor", "EngineConfig", engine=Flag(metavar="{local,ray}"),
                ray_address=Flag(metavar="ADDRESS"), ray_workers=Flag(metavar="N"),
                ray_retries=Flag(metavar="N"))
"""The EngineConfig flags (each written once, as its field; here only where a flag differs)."""


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--engine local|ray``, ``--ray-address``, ``--ray-workers`` and ``--ray-retries``."""
    CONFIG.add(p)


def engine_from_args(args: argparse.Namespace):
    """The :class:`~latentaudit.executor.Executor` the flags ask for (checked: a bad value, or
    Ray missing for ``--engine ray``, is one error before anything loads)."""
    from latentaudit.executor import as_executor

    return as_executor(CONFIG.build(args))
