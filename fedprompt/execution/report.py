"""Runs side by side: read results folders and compare them in one table (rich, Markdown, CSV)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedprompt.errors import RunFolderError
from fedprompt.execution.results import METRICS_FILE, SUMMARY_FILE, RunDirectory
from fedprompt.execution.tables import format_number, markdown_table

ACCURACY_CURVES = (
    ("global_accuracy", "global"),
    ("local_accuracy", "local"),
    ("personal_accuracy_mean", "personal mean"),
    ("personal_accuracy_worst", "personal worst"),
    ("finetuned_accuracy_mean", "fine-tuned mean"),
    ("base_accuracy", "base"),
    ("novel_accuracy", "novel"),
    ("harmonic_mean", "HM"),
)
"""The accuracy metrics a run may record (history key, label), in the order they are shown."""

_FINAL_COLUMNS = (
    ("base_accuracy", "base acc"),
    ("novel_accuracy", "novel acc"),
    ("harmonic_mean", "HM"),
    ("personal_accuracy_mean", "personal acc mean"),
    ("personal_accuracy_worst", "personal acc worst"),
    ("finetuned_accuracy_mean", "fine-tuned acc mean"),
)
"""Metrics reported at their last value, as a column only when some run has them."""


@dataclass
class RunRecord:
    """What one run left behind: its label (the folder's name), per-round rows and summary."""

    label: str
    history: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of one metric, over the rows that hold it."""
        rows = [row for row in self.history if key in row]
        return [row["round"] for row in rows], [float(row[key]) for row in rows]

    def cumulative_bytes(self) -> dict[int, int]:
        """Bytes up and down of every client, summed over the rounds up to each round (round 0: 0)."""
        total, out = 0, {}
        for row in sorted(self.history, key=lambda r: r["round"]):
            total += row.get("bytes_up", 0) + row.get("bytes_down", 0)
            out[row["round"]] = total
        return out


def load_run(path: Path) -> RunRecord:
    """The record of a results folder; RunFolderError when it is not one or holds no rounds yet."""
    folder = RunDirectory.existing(path)
    history = folder.read(METRICS_FILE)
    if not history:
        raise RunFolderError(f"{str(folder.path)!r} holds no {METRICS_FILE} rows yet: the run never started")
    summary_file = folder.path / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return RunRecord(folder.path.name, history, summary, folder.path)


def comparison_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, read from its metrics: final and best global accuracy (and its round), the last
    base/novel/HM and personalised accuracies, bytes per client per round (mean over the trained
    rounds) and in total, wall time (sum of the rounds' times) and the last ε. Columns that no run has
    are left out; a run without a value has None."""
    extra = [(key, name) for key, name in _FINAL_COLUMNS if any(run.curve(key)[0] for run in runs)]
    private = any(run.curve("epsilon")[0] for run in runs)
    rows = []
    for run in runs:
        trained = [row for row in run.history if row["round"] > 0]
        rounds, accuracy = run.curve("global_accuracy")
        best = max(range(len(accuracy)), key=accuracy.__getitem__) if accuracy else None
        row: dict[str, Any] = {
            "run": run.label,
            "rounds": max((r["round"] for r in run.history), default=0),
            "final acc": accuracy[-1] if accuracy else None,
            "best acc": accuracy[best] if best is not None else None,
            "best round": rounds[best] if best is not None else None,
        }
        for key, name in extra:
            values = run.curve(key)[1]
            row[name] = values[-1] if values else None
        for way in ("up", "down"):
            per_client = [r[f"bytes_{way}_per_client"] for r in trained if f"bytes_{way}_per_client" in r]
            row[f"{way} B/client/round"] = _mean(per_client)
        row["total bytes"] = sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in trained)
        row["wall s"] = sum(r.get("time_s", 0.0) for r in run.history)
        if private:
            values = run.curve("epsilon")[1]
            row["epsilon"] = values[-1] if values else None
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_value(column: str, value: Any) -> str:
    """A table cell: accuracies to 4 places, bytes whole, seconds to 1 place, epsilon to 3."""
    if value is None or isinstance(value, str) or column in ("rounds", "best round", "total bytes"):
        return "" if value is None else str(value)
    digits = 0 if "B/" in column else 1 if column == "wall s" else 3 if column == "epsilon" else 4
    return format_number(value, digits)


def write_markdown(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The table as GitHub Markdown (values as printed)."""
    columns = list(rows[0])
    path.write_text(markdown_table(columns, [[format_value(c, row[c]) for c in columns] for row in rows]))
