"""Formatting and figure output shared by the report's modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amoc.io import write_with

DPI = 120


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: "n/a" for None, floats with `digits` decimals, anything else as text."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def save_png(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure atomically (temp file, then rename)."""
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    return path
