"""The Markdown every benchmark report writes: numbers, table rows, tables, verdict marks."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["met", "num", "row", "table"]


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
