"""The ``--engine`` options every command that runs a model shares (standard library only)."""

from __future__ import annotations

import argparse

from latentaudit.cli import field_docs


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--engine local|ray``, ``--ray-address``, ``--ray-workers`` and ``--ray-retries``."""
    doc = field_docs("executor.py", "EngineConfig")
    p.add_argument("--engine", default="local", metavar="{local,ray}", help=doc["engine"])
    p.add_argument("--ray-address", metavar="ADDRESS", help=doc["ray_address"])
    p.add_argument("--ray-workers", type=int, metavar="N", help=doc["ray_workers"])
    p.add_argument("--ray-retries", type=int, default=3, metavar="N", help=doc["ray_retries"])


def engine_from_args(args: argparse.Namespace):
    """The :class:`~latentaudit.executor.Executor` the flags ask for (checked: a bad value, or
    Ray missing for ``--engine ray``, is one error before anything loads)."""
    from latentaudit.executor import EngineConfig, as_executor

    return as_executor(EngineConfig(engine=args.engine, ray_address=args.ray_address,
                                    ray_workers=args.ray_workers, ray_retries=args.ray_retries))
