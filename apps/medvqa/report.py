"""The app's results table, as Markdown (with what was run above it) and as CSV."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedprompt.execution.tables import format_number, markdown_table, write_csv
from fedprompt.files import write_text_atomically

MARKDOWN_FILE, CSV_FILE = "results.md", "results.csv"


SECONDS_SUFFIX = " s"
"""A column whose title ends so holds seconds, written to one decimal place (accuracies to four)."""
BYTES_PREFIX = "bytes"
"""A column whose title starts so holds bytes, written whole."""


def format_cell(column: str, value: object) -> str:
    """A cell: bytes whole, seconds to one place, other numbers to four, the rest as text."""
    if not isinstance(value, float):
        return "" if value is None else str(value)
    return format_number(
        value, 0 if column.startswith(BYTES_PREFIX) else 1 if column.endswith(SECONDS_SUFFIX) else 4
    )


def results_table(rows: Sequence[dict[str, object]]) -> str:
    """Rows (one mapping each, the first one's keys as the columns) as a Markdown table."""
    columns = list(rows[0])
    return markdown_table(columns, [[format_cell(c, row[c]) for c in columns] for row in rows])


def write_results(
    folder: Path, rows: Sequence[dict[str, object]], runs: Sequence[dict[str, object]], header: Sequence[str]
) -> tuple[Path, Path]:
    """``results.md`` (``header`` lines, the runs' table, the accuracy table) and ``results.csv``
    (the accuracy table) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(
        [
            "# Federated VQA: personalised vs FedAvg vs local-only",
            "",
            *header,
            "",
            "## Runs",
            "",
            results_table(runs),
            "",
            "## Accuracy on each client's test questions",
            "",
            results_table(rows),
            "",
        ]
    )
    markdown, table = folder / MARKDOWN_FILE, folder / CSV_FILE
    write_text_atomically(markdown, text)
    write_csv(rows, table)
    return markdown, table
