"""One progress bar for every long stage: a count, a rate and an ETA, on stderr."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None) -> Any:
    """Wrap ``iterable`` in a tqdm bar (count, rate, ETA); silent when LATENTAUDIT_QUIET=1."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("LATENTAUDIT_QUIET") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}, {rate_fmt}]")
