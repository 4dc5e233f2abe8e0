"""One progress bar for every long stage: a count, a rate and an ETA, on stderr."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


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
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                unit_scale=unit_scale, unit_divisor=unit_divisor, initial=initial,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}, {rate_fmt}]")
