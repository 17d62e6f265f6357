"""Markdown tables: the one place that makes a cell safe (the ``lr|sr`` arm's ``|`` splits one)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["md_cell", "md_table"]


def md_cell(text: object) -> str:
    """``text`` safe inside a Markdown table cell: each ``|`` escaped as ``\\|``.

    Args:
        text: The cell's content (anything ``str`` takes).

    Returns:
        The escaped text.
    """
    return str(text).replace("|", "\\|")


def md_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table of ``header`` and ``rows``, every cell escaped by :func:`md_cell`.

    Args:
        header: The column names.
        rows: The rows, each as long as ``header``.

    Returns:
        The table's lines joined by newlines (no trailing newline).
    """

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
