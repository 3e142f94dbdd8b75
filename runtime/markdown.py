"""Markdown tables for the reports (standard library only)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_SEPARATORS = {"l": "---", "r": "---:"}


def table(head: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> list[str]:
    """The lines of a markdown table: the header, the separator and one line per row.

    ``align`` has one letter per column, ``l`` (left) or ``r`` (right); by default
    the first column is left-aligned and the others right-aligned. Cells are
    written with ``str``.
    """
    if align is None:
        align = "l" + "r" * (len(head) - 1)
    if len(align) != len(head) or not set(align) <= set(_SEPARATORS):
        raise ValueError(f"align {align!r}: one letter, l or r, per column ({len(head)} columns)")
    sep = "|" + "".join(_SEPARATORS[a] + "|" for a in align)
    return [_line(head), sep] + [_line(row) for row in rows]


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
