"""One progress bar for every long stage: a count, a rate and an ETA, on stderr.

Bars are remembered while open, so that an error or a log message never lands on a bar's line:
:func:`close_bars` ends them before the command line prints an error, and
:class:`BarSafeHandler` writes log records above them.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Iterable
from typing import Any

_bars: weakref.WeakSet = weakref.WeakSet()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None, unit_scale: bool = False,
             unit_divisor: int = 1000, initial: int = 0) -> Any:
    """Wrap ``iterable`` in a tqdm bar (count, rate, ETA); silent when LATENTAUDIT_QUIET=1.

    ``unit_scale``/``unit_divisor`` show large counts as k/M (bytes: unit="B", divisor 1024);
    ``initial`` starts a resumed bar at the work already done.
    """
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("LATENTAUDIT_QUIET") == "1"
    bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
               unit_scale=unit_scale, unit_divisor=unit_divisor, initial=initial,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                          "[{elapsed}<{remaining}, {rate_fmt}]")
    _bars.add(bar)
    return bar


def end_at_count(bar: Any) -> None:
    """A bar whose input ran out before its estimated total ends at 100% of what it did,
    not at 67% as if it had been interrupted."""
    if bar.total is not None and bar.n < bar.total:
        bar.total = bar.n
        bar.refresh()


def open_bars() -> list[Any]:
    """The bars made by :func:`progress` that are shown and not closed yet."""
    return [bar for bar in list(_bars) if not bar.disable]


def close_bars() -> None:
    """Close every open bar (each ends its line), e.g. before printing an error."""
    for bar in open_bars():
        bar.close()


class BarSafeHandler(logging.Handler):
    """A stderr log handler that writes above open progress bars instead of onto their line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if open_bars():
                from tqdm.auto import tqdm

                tqdm.write(message, file=sys.stderr)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:  # a failing log call must not end the run
            self.handleError(record)
