"""Render the report's context to one self-contained HTML page with jinja2 (autoescape on).

1. The templates under ``report/templates/`` are HTML with autoescaping on: every model and
   corpus string is escaped; nothing from a run is ever marked safe. Figures are
   ``data:`` URIs (base64 needs no escaping), highlight styles hold numbers only.
2. The stylesheet and the script are included inline; the page's Content-Security-Policy
   allows that one script (by its sha256), inline styles and ``data:`` images, and nothing else:
   no request leaves the page, and an injected script or event handler would not run.
"""

from __future__ import annotations

import base64
import hashlib
import math
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"


@cache
def environment():
    """The jinja2 environment (autoescape on for every template)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(num=num, fixed=fixed, pct=pct, pp=pp, ci=ci, visible=visible)
    return env


def script_hash() -> str:
    """The CSP source of the page's one script: ``'sha256-<base64>'``."""
    text = environment().get_template("report.js").render()
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render(context: dict[str, Any]) -> str:
    """The HTML page of a context from :func:`~latentaudit.report.context.build_context`."""
    return environment().get_template("report.html").render(context, script_hash=script_hash())


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 3) -> str:
    """A number in ``digits`` significant digits (scientific when tiny or huge); – for none."""
    if not _finite(x):
        return "–" if x is None else str(x)
    if isinstance(x, int):
        return str(x)
    if x != 0 and not 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fixed(x: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals (AUCs, precisions); – for none."""
    return f"{x:.{digits}f}" if _finite(x) else "–"


def pct(x: Any) -> str:
    """A rate as a percentage."""
    return f"{100 * x:.1f}%" if _finite(x) else "–"


def pp(x: Any) -> str:
    """A change of rate in percentage points, signed."""
    return f"{100 * x:+.1f} pp" if _finite(x) else "–"


def ci(pair: Any, kind: str = "num") -> str:
    """An interval [lo, hi] as numbers, two decimals (fixed), percentages (pct) or signed
    points (pp); – if missing."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(map(_finite, pair)):
        return "–"
    fmt = {"num": num, "fixed": fixed, "pct": pct, "pp": pp}[kind]
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def visible(token: Any) -> str:
    """A token with its line breaks and tabs shown as symbols (spaces stay, see the CSS)."""
    return str(token).replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")
