"""The Markdown every benchmark report writes: numbers, table rows, tables, verdict marks, and the
command that reproduces the report."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["met", "num", "reproduce", "row", "table"]


def reproduce(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reruns ``python -m module`` as invoked (`argv`, or the process's own
    arguments when None), ``--quiet`` left out since it changes no figure."""
    return f"python -m {module}" + " ".join(a for a in ["", *(argv or sys.argv[1:])] if a != "--quiet")


def num(value: float | None, digits: int = 3) -> str:
    """A measured number, or an en dash where there is none."""
    return "–" if value is None else f"{value:.{digits}f}"


def row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [row(header), row(["---"] * len(header)), *(row(r) for r in rows)]


def met(verdict: bool | None) -> str:
    """A verdict's mark: met, not met (bold), or no measurement."""
    return "–" if verdict is None else "yes" if verdict else "**no**"
