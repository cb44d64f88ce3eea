"""The comparison table: each run's values read from its folder, their mean ± std over seeds, and the
Markdown and CSV files; the mean curves over seeds that the plots draw."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprompt.execution.report import RunRecord, comparison_rows
from fedprompt.execution.tables import format_number, markdown_table

WALL_TIME = "wall_time_s"
"""The summary.json key of a method's wall time in this process (loading, encoding, rounds)."""

BASE_TO_NOVEL = (("base_accuracy", "base"), ("novel_accuracy", "novel"), ("harmonic_mean", "HM"))
"""The base-to-novel comparison's accuracies: (key, Markdown header)."""
ACROSS_DOMAINS = (
    ("domain_mean_accuracy", "domain mean"),
    ("domain_worst_accuracy", "worst domain"),
    ("held_out_accuracy", "held-out domain"),
)
"""The multi-domain comparison's accuracies after each domain's own (``domain_<name>_accuracy``)."""
PER_CLIENT = (
    ("local_accuracy_mean", "local (client mean)"),
    ("personal_accuracy_mean", "personal (client mean)"),
    ("finetuned_accuracy_mean", "fine-tuned (client mean)"),
)
"""Accuracies on each client's held-out split (the last two for methods that keep a personal prompt)."""
COSTS = (
    ("bytes_up_per_client_round", "up B/client/round"),
    ("bytes_down_per_client_round", "down B/client/round"),
    (WALL_TIME, "wall s"),
)
_DOMAIN = re.compile(r"^domain_(.+)_accuracy$")
_SUMMARIES = {"domain_mean_accuracy", "domain_worst_accuracy"}


@dataclass(frozen=True)
class RunValues:
    """One method's run with one seed: where it is and the table's values (None: not measured)."""

    method: str
    base: str
    seed: int
    folder: Path
    values: dict[str, float | None]


def run_values(method: str, base: str, seed: int, run: RunRecord) -> RunValues:
    """The table's values of a run from its metrics.jsonl and summary.json: the last value of every
    accuracy it records (base/novel/HM, each domain's, their mean and worst, the held-out domain's,
    the client means), bytes up and down per client per round (the mean over the trained rounds, as
    ``fedprompt report``; 0 for a run that trained no round), wall time."""
    values: dict[str, float | None] = {}
    recorded = [k for row in run.history for k in row if k.endswith(("_accuracy", "_accuracy_mean"))]
    for key in dict.fromkeys([*recorded, "harmonic_mean", "local_accuracy_mean"]):  # in the runs' order
        curve = run.curve(key)[1]
        values[key] = curve[-1] if curve else None
    trained = any(row["round"] > 0 for row in run.history)
    report = comparison_rows([run])[0]
    values["bytes_up_per_client_round"] = report["up B/client/round"] if trained else 0.0
    values["bytes_down_per_client_round"] = report["down B/client/round"] if trained else 0.0
    values[WALL_TIME] = run.summary.get(WALL_TIME)
    assert run.path is not None  # read from a folder
    return RunValues(method, base, seed, run.path, values)


def columns(runs: Sequence[RunValues]) -> list[tuple[str, str]]:
    """The table's columns for these runs, (key, Markdown header): across domains (when the runs
    report a domain mean) each domain's accuracy, their mean and worst, the held-out domain's;
    otherwise base, novel and HM; then the client means some run has, bytes and wall time."""
    present = [key for run in runs for key, value in run.values.items() if value is not None]
    if "domain_mean_accuracy" in present:
        domains = [k for k in dict.fromkeys(present) if _DOMAIN.match(k) and k not in _SUMMARIES]
        head = [(k, _DOMAIN.match(k).group(1)) for k in domains]  # type: ignore[union-attr]
        head += [(k, name) for k, name in ACROSS_DOMAINS if k in present]
    else:
        head = list(BASE_TO_NOVEL)
    clients = [(k, name) for k, name in PER_CLIENT if k == "local_accuracy_mean" or k in present]
    return [*head, *clients, *COSTS]


def summary_rows(runs: Sequence[RunValues]) -> list[dict[str, Any]]:
    """One row per method (in the order first met): its seeds and, per column, mean and sample
    standard deviation over the seeds (std None with one seed)."""
    methods = list(dict.fromkeys(run.method for run in runs))
    rows = []
    for method in methods:
        mine = [run for run in runs if run.method == method]
        row: dict[str, Any] = {
            "method": method,
            "base": mine[0].base,
            "seeds": " ".join(str(r.seed) for r in mine),
        }
        for key, _ in columns(runs):
            numbers = [run.values[key] for run in mine if run.values.get(key) is not None]
            row[f"{key}_mean"] = statistics.fmean(numbers) if numbers else None
            row[f"{key}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
        rows.append(row)
    return rows


def format_cell(key: str, mean: float | None, std: float | None) -> str:
    """``mean ± std`` (or the mean alone): accuracies to 4 places, bytes whole, seconds to 1 place."""
    return format_number(mean, 0 if key.startswith("bytes") else 1 if key == WALL_TIME else 4, std)


def comparison_table(
    rows: Sequence[dict[str, Any]], titles: dict[str, str], shown: Sequence[tuple[str, str]]
) -> str:
    """The comparison as a GitHub Markdown table, one line per method, the ``shown`` columns."""
    headers = ["method", "seeds", *(header for _, header in shown)]
    cells = [
        [titles.get(row["method"], row["method"]), str(len(row["seeds"].split()))]
        + [format_cell(key, row[f"{key}_mean"], row[f"{key}_std"]) for key, _ in shown]
        for row in rows
    ]
    return markdown_table(headers, cells)


def per_run_rows(runs: Sequence[RunValues]) -> list[dict[str, Any]]:
    """One row per method and seed: the values of that run in the table's columns, and its folder."""
    keys = [key for key, _ in columns(runs)]
    return [
        {
            "method": run.method,
            "base": run.base,
            "seed": run.seed,
            **{key: run.values.get(key) for key in keys},
            "folder": run.folder.name,
        }
        for run in runs
    ]


def mean_record(label: str, runs: Sequence[RunRecord]) -> RunRecord:
    """A record whose rows are the mean over ``runs`` (one per seed) of every number that all of
    them hold in a round that all of them reached (the curve a plot draws for a method)."""
    by_round = [{row["round"]: row for row in run.history} for run in runs]
    rounds = sorted(set.intersection(*(set(rows) for rows in by_round)))
    history = []
    for number in rounds:
        rows = [rows[number] for rows in by_round]
        keys = set.intersection(*(set(row) for row in rows)) - {"round"}
        numeric = [k for k in sorted(keys) if all(_is_number(row[k]) for row in rows)]
        history.append({"round": number, **{k: statistics.fmean(row[k] for row in rows) for k in numeric}})
    return RunRecord(label, history)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
