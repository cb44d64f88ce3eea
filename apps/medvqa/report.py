"""The app's results table, as Markdown (with what was run above it) and as CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from fedprompt.files import write_text_atomically

MARKDOWN_FILE, CSV_FILE = "results.md", "results.csv"


SECONDS_SUFFIX = " s"
"""A column whose title ends so holds seconds, written to one decimal place (accuracies to four)."""
BYTES_PREFIX = "bytes"
"""A column whose title starts so holds bytes, written whole."""


def format_cell(column: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if column.startswith(BYTES_PREFIX):
            return f"{value:.0f}"
        return f"{value:.1f}" if column.endswith(SECONDS_SUFFIX) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, object]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


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
            markdown_table(runs),
            "",
            "## Accuracy on each client's test questions",
            "",
            markdown_table(rows),
            "",
        ]
    )
    markdown, table = folder / MARKDOWN_FILE, folder / CSV_FILE
    write_text_atomically(markdown, text)
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return markdown, table
