"""Tables of results as people read them: GitHub Markdown for results files, right-aligned plain
text for a terminal, CSV at full precision; and numbers written with a fixed count of decimals
(each report says which columns get how many). Every report of fedprompt and its apps writes its
tables through these."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def format_number(value: float | None, digits: int, std: float | None = None, missing: str = "") -> str:
    """``value`` to ``digits`` decimals, ``value ± std`` when a spread is given, ``missing`` for None."""
    if value is None:
        return missing
    text = f"{value:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table of formatted cells: the header line, its separator, a line per row."""
    lines = [_markdown_line(headers), _markdown_line(["---"] * len(headers))]
    lines += [_markdown_line(row) for row in rows]
    return "\n".join(lines) + "\n"


def _markdown_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Formatted cells in right-aligned columns two spaces apart, the header line first."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [headers, *rows]
    )


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Rows (one mapping each, the first one's keys as the columns) as CSV with full-precision
    values, empty where a value is None."""
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
