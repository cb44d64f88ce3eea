"""`fedprompt plot` and `fedprompt report`: PNG files written, table values equal to the metrics files'."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest
from typer.testing import CliRunner

import fedprompt
from fedprompt.cli import app
from fedprompt.config import load_config
from fedprompt.execution.results import RunDirectory

from conftest import tiny_run_config, write_keyword_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PLAIN = [
    {"round": 0, "global_accuracy": 0.25, "local_accuracy": 0.3},
    {"round": 1, "bytes_up": 400, "bytes_down": 600, "bytes_up_per_client": 100.0,
     "bytes_down_per_client": 150.0, "global_accuracy": 0.5, "time_s": 1.5},
    {"round": 2, "bytes_up": 400, "bytes_down": 600, "bytes_up_per_client": 100.0,
     "bytes_down_per_client": 150.0, "time_s": 2.0},
    {"round": 3, "bytes_up": 300, "bytes_down": 450, "bytes_up_per_client": 100.0,
     "bytes_down_per_client": 150.0, "global_accuracy": 0.375, "time_s": 0.5},
]  # fmt: skip
"""A run evaluated in rounds 0, 1 and 3: best accuracy in round 1, not the last."""

PRIVATE = [
    {"round": 0, "global_accuracy": 0.125, "personal_accuracy_mean": 0.5, "personal_accuracy_worst": 0.25},
    {"round": 1, "bytes_up": 64, "bytes_down": 32, "bytes_up_per_client": 32.0, "bytes_down_per_client": 16.0,
     "global_accuracy": 0.625, "personal_accuracy_mean": 0.75, "personal_accuracy_worst": 0.5,
     "epsilon": 1.25, "time_s": 3.0},
    {"round": 2, "bytes_up": 32, "bytes_down": 16, "bytes_up_per_client": 16.0, "bytes_down_per_client": 8.0,
     "global_accuracy": 0.75, "personal_accuracy_mean": 0.875, "personal_accuracy_worst": 0.625,
     "epsilon": 2.5, "time_s": 1.0},
]  # fmt: skip
"""A personalised run with differential privacy (ε per round)."""


def _run_folder(base, name, rows):
    folder = RunDirectory.create(base, name)
    folder.write_config(load_config(overrides=[f"name={name}"]))
    folder.append("metrics.jsonl", rows)
    return folder.path


@pytest.fixture
def two_runs(tmp_path):
    return _run_folder(tmp_path / "runs", "plain", PLAIN), _run_folder(tmp_path / "runs", "private", PRIVATE)


def test_plot_writes_a_png_for_one_run_into_its_folder_and_for_several_where_told(two_runs, tmp_path):
    plain, private = two_runs
    runner = CliRunner()
    result = runner.invoke(app, ["plot", str(plain)])
    assert result.exit_code == 0, result.output
    assert (plain / "plot.png").read_bytes().startswith(PNG_SIGNATURE)

    out = tmp_path / "figures" / "both.png"
    result = runner.invoke(app, ["plot", str(plain), str(private), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000  # three panels of curves
    assert str(out) in result.output


def test_cumulative_bytes_count_up_and_down_of_every_round():
    from fedprompt.execution.report import RunRecord

    assert RunRecord("r", PLAIN).cumulative_bytes() == {0: 0, 1: 1000, 2: 2000, 3: 2750}


def test_report_table_holds_the_metrics_files_values(two_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    plain, private = two_runs
    result = CliRunner().invoke(app, ["report", str(plain), str(private), "-o", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output

    with (tmp_path / "cmp.csv").open() as handle:
        first, second = list(csv.DictReader(handle))
    assert first["run"] == plain.name and second["run"] == private.name
    assert float(first["final acc"]) == 0.375 and float(first["best acc"]) == 0.5
    assert int(first["best round"]) == 1 and int(first["rounds"]) == 3
    assert float(first["up B/client/round"]) == 100.0 and float(first["down B/client/round"]) == 150.0
    assert int(first["total bytes"]) == 400 + 600 + 400 + 600 + 300 + 450
    assert float(first["wall s"]) == 1.5 + 2.0 + 0.5
    assert first["epsilon"] == "" and first["personal acc mean"] == ""
    assert float(second["final acc"]) == 0.75 and float(second["best acc"]) == 0.75
    assert float(second["up B/client/round"]) == 24.0 and float(second["down B/client/round"]) == 12.0
    assert int(second["total bytes"]) == 144 and float(second["epsilon"]) == 2.5
    assert float(second["personal acc mean"]) == 0.875 and float(second["personal acc worst"]) == 0.625
    assert "base acc" not in first  # no run has base-to-novel metrics

    markdown = (tmp_path / "cmp.md").read_text().splitlines()
    assert markdown[0].startswith("| run | rounds | final acc | best acc |")
    assert f"| {plain.name} | 3 | 0.3750 | 0.5000 | 1 |" in markdown[2]
    assert "| 2.500 |" in markdown[3]
    assert "0.3750" in result.output and "2.500" in result.output  # the printed table


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl", n=120)


def test_a_run_plots_itself_unless_told_not_to_and_without_matplotlib_still_finishes(
    keyword_file, tmp_path, monkeypatch, caplog, one_intra_op_thread
):
    config = tiny_run_config(keyword_file, federation={"rounds": 1}, output={"plot": True})
    plotted = fedprompt.run(config, output_dir=tmp_path / "a").run_dir
    assert (plotted / "plot.png").read_bytes().startswith(PNG_SIGNATURE)

    unplotted = fedprompt.run({**config, "output": {"plot": False}}, output_dir=tmp_path / "b").run_dir
    assert (unplotted / "summary.json").is_file() and not (unplotted / "plot.png").exists()

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with caplog.at_level(logging.WARNING, logger="fedprompt.plots"):
        bare = fedprompt.run(config, output_dir=tmp_path / "c").run_dir
    assert json.loads((bare / "summary.json").read_text())["rounds"] == 1
    assert not (bare / "plot.png").exists() and "matplotlib is not installed" in caplog.text


def test_bytes_go_on_a_log_axis_where_asked_without_the_untrained_round(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fedprompt.execution.plots import plot_runs
    from fedprompt.execution.report import RunRecord

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep each figure to read its axes
    runs = [RunRecord("small", PLAIN), RunRecord("large", [{**r, "bytes_up": r.get("bytes_up", 0) * 10**4}
                                                           for r in PLAIN])]  # fmt: skip
    for log_bytes in (False, True):
        out = plot_runs(
            runs, tmp_path / f"{log_bytes}.png", [("global_accuracy", "global")], log_bytes=log_bytes
        )
        assert out.read_bytes().startswith(PNG_SIGNATURE)
    linear, logarithmic = (figure.axes[1] for figure in figures)
    assert linear.get_xscale() == "linear" and logarithmic.get_xscale() == "log"
    # round 0 sent nothing: on the linear axis it sits at 0, on the log axis it is left off
    assert [list(line.get_xdata()) for line in linear.get_lines()] == [
        [0, 1000, 2750],
        [0, 4000600, 11001650],
    ]
    assert [list(line.get_xdata()) for line in logarithmic.get_lines()] == [[1000, 2750], [4000600, 11001650]]
