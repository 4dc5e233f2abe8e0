"""Per-token highlight intensity, computed in Python so the page needs no script to show it.

A token's value v on a scale s > 0 becomes the inline style ``background-color:rgba(r,g,b,a)``
with a = min(1, |v| / s) · 0.85: the colour says the sign (what pushes toward the behaviour is
red, what pushes away blue, activations orange), the opacity the size. The style holds numbers
only; the token text stays plain text for the template to escape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

RED = (214, 39, 40)
"""δ_{i,t} > 0: the token's latent activity raises the loss gap toward the behaviour."""
BLUE = (31, 119, 180)
ORANGE = (255, 127, 14)
"""Activations of top-activating examples (never negative)."""
MAX_ALPHA = 0.85


def style(value: float | None, scale: float, positive=RED, negative=BLUE) -> str:
    """The inline background style of one value ("" for 0, None, NaN or a zero scale)."""
    if value is None or not math.isfinite(value) or not scale > 0 or value == 0:
        return ""
    alpha = min(1.0, abs(value) / scale) * MAX_ALPHA
    r, g, b = positive if value > 0 else negative
    return f"background-color:rgba({r},{g},{b},{alpha:.3f})"


def scale_of(values: Sequence[Sequence[float | None]]) -> float:
    """The largest finite |value| over several token rows (0 when there is none)."""
    finite = [abs(v) for row in values for v in row if v is not None and math.isfinite(v)]
    return max(finite, default=0.0)


def spans(tokens: Sequence[str], values: Sequence[float | None], scale: float, *,
          palette: tuple = (RED, BLUE), mark: int | None = None, prompt: int = 0,
          label: str = "δ") -> list[dict[str, Any]]:
    """One dict per token: ``text`` (raw, escaped later), ``style``, ``title`` (the value),
    ``mark`` (the activating token of an example) and ``prompt`` (before the completion)."""
    out = []
    for n, (text, v) in enumerate(zip(tokens, values, strict=True)):
        out.append({"text": text, "style": style(v, scale, *palette),
                    "title": "" if v is None else f"{label} = {v:.4g}",
                    "mark": n == mark, "prompt": n < prompt})
    return out
