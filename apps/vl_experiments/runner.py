"""Run every method of an experiment with every seed, then write the table and the plots.

Everything that can be checked is checked first (the experiment, every method's run configuration,
the layer-dependent prompt fields against the backbone's model configuration, the output folder), so
a mistake stops the experiment before a model loads. The runs then go one after another in this
process, seed by seed, each into its own run folder under ``<out>/runs/``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from apps.vl_experiments.config import DEMO_BACKBONE, ExperimentConfig, load_experiment
from apps.vl_experiments.methods import METHOD_TITLES, ZERO_SHOT
from apps.vl_experiments.table import (
    WALL_TIME,
    RunValues,
    columns,
    comparison_table,
    mean_record,
    per_run_rows,
    run_values,
    summary_rows,
)
from apps.vl_experiments.zero_shot import run_zero_shot
from fedprompt.config import ConfigError, RunConfig
from fedprompt.execution.report import load_run
from fedprompt.execution.results import SUMMARY_FILE, RunDirectory
from fedprompt.execution.simulation import run_in_process
from fedprompt.execution.tables import write_csv
from fedprompt.files import write_text_atomically
from fedprompt.tasks.preflight import check_model_fields
from fedprompt.tasks.registry import build_experiment

log = logging.getLogger("apps.vl_experiments")

EXPERIMENT_FILE = "experiment.yaml"
TABLE_FILE = "comparison"
RUNS_TABLE_FILE = "runs.csv"
PLOTS = (
    ("harmonic_mean", "HM"),
    ("base_accuracy", "base accuracy"),
    ("novel_accuracy", "novel accuracy"),
    ("local_accuracy_mean", "local accuracy (client mean)"),
)
"""The plots of a base-to-novel comparison, written to ``<out>/plots/<key>.png``: (metrics key, label)."""
DOMAIN_PLOTS = (
    ("domain_mean_accuracy", "accuracy, mean over domains"),
    ("domain_worst_accuracy", "accuracy on the worst domain"),
    ("held_out_accuracy", "accuracy on the held-out domain"),
    ("local_accuracy_mean", "local accuracy (client mean)"),
)
"""The plots of a comparison across domains."""


@dataclass
class Comparison:
    """What an experiment left: its folder, every run's values and the table's rows."""

    folder: Path
    runs: list[RunValues]
    rows: list[dict]

    @property
    def markdown(self) -> str:
        return (self.folder / f"{TABLE_FILE}.md").read_text()


def select(
    config: ExperimentConfig, seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None
) -> ExperimentConfig:
    """The experiment restricted to ``methods`` (in the order given) and run with ``seeds`` (None:
    the config's), validated again."""
    if methods:
        unknown = [m for m in methods if m not in config.methods]
        if unknown:
            raise ConfigError(
                f"--methods {unknown}: not in the experiment; its methods are {list(config.methods)}"
            )
    raw = config.model_dump(mode="json", exclude_none=False)
    if seeds:
        raw["seeds"] = list(seeds)
    if methods:
        raw["methods"] = {m: raw["methods"][m] for m in methods}
    return load_experiment(raw)


def plan(config: ExperimentConfig) -> list[tuple[int, str, RunConfig]]:
    """(seed, method, run configuration) of every run, checked as far as it can be without loading
    a model."""
    config.check_backbone_available()
    runs = [
        (seed, method, config.run_config(method, seed)) for seed in config.seeds for method in config.methods
    ]
    for _, method, run_config in runs[: len(config.methods)]:  # the seed does not change a shape
        try:
            check_model_fields(run_config)
        except ConfigError as exc:
            raise ConfigError(f"invalid experiment configuration: methods.{method}: {exc}") from None
    return runs


def output_folder(config: ExperimentConfig, out: Path | None) -> Path:
    """``out`` (new or empty), or ``<output.dir>/<name>-<time>``."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = config.output.dir / f"{config.name}-{stamp}"
        suffix = 1
        while out.exists():
            suffix += 1
            out = config.output.dir / f"{config.name}-{stamp}-{suffix}"
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} is not a new or empty folder; name another one")
    return out


def run_comparison(config: ExperimentConfig, out: Path | None = None) -> Comparison:
    """Run the experiment into ``out`` (see ``output_folder``); return its table."""
    runs = plan(config)
    folder = output_folder(config, out)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        folder / EXPERIMENT_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    values = []
    for seed, method, run_config in runs:
        run_dir = RunDirectory(folder / "runs" / f"{method}-seed{seed}")
        run_dir.path.mkdir(parents=True)
        start = time.perf_counter()
        if config.base_of(method) == ZERO_SHOT:
            run_zero_shot(run_config, config.class_template, run_dir)
        else:
            run_dir.write_config(run_config)
            run_in_process(build_experiment(run_config), run_config, run_dir)
        _record_wall_time(run_dir, time.perf_counter() - start)
        values.append(run_values(method, config.base_of(method), seed, load_run(run_dir.path)))
        log.info("seed %d, %s: %s", seed, method, _brief(values[-1]))
    rows = summary_rows(values)
    write_tables(config, folder, values, rows)
    write_plots(config, folder, values)
    return Comparison(folder, values, rows)


def _record_wall_time(run_dir: RunDirectory, seconds: float) -> None:
    summary = json.loads((run_dir.path / SUMMARY_FILE).read_text())
    run_dir.write_summary({**summary, WALL_TIME: seconds})


def _brief(run: RunValues) -> str:
    keys = ("base_accuracy", "novel_accuracy", "harmonic_mean", "domain_mean_accuracy", "held_out_accuracy")
    shown = {k: v for k, v in run.values.items() if k in keys}
    parts = [f"{k} {v:.4f}" for k, v in shown.items() if v is not None]
    return ", ".join([*parts, f"{run.values[WALL_TIME]:.1f} s"])


def describe(config: ExperimentConfig, runs: Sequence[RunValues]) -> str:
    """The lines above the table: backbone (and a demo backbone's note), data, partition, federation."""
    backbone = config.backbone
    lines = [f"# {config.name}: vision-language prompt methods compared", ""]
    weights = "" if backbone.model.startswith("bundled:") else f", weights {backbone.pretrained}"
    lines.append(f"- backbone: {backbone.model}{weights} (frozen)")
    note = _backbone_note(runs)
    if note is None and backbone.model == DEMO_BACKBONE:
        note = "a demo backbone pre-trained offline by fedprompt (`fedprompt demo-backbone`), not a real CLIP"
    if note:
        lines.append(f"- note: {note}")
    data = config.data
    names = data.name if data.source != "datasets" else ", ".join(str(d.name) for d in data.datasets or [])
    if config.across_domains:
        held = data.domain_settings.held_out
        lines.append(
            f"- data: {data.source} {names}, across domains: accuracy on each trained domain's test images "
            "(the domain unknown to the model), their mean and the worst"
            + (f"; {held!r} is held out (never trained on) and reported apart" if held else "")
        )
    else:
        lines.append(
            f"- data: {data.source} {names}, base-to-novel: the last {data.novel_class_fraction:g} of the "
            "classes are novel (never trained on); base accuracy on the test set's base classes"
        )
    part, fed = config.partition, config.federation
    lines.append(
        f"- partition: {part.kind}, {part.num_clients} clients, each holding out "
        f"{part.local_val_fraction:g} of its data for local accuracy; {fed.rounds} rounds"
    )
    lines.append(f"- seeds: {' '.join(str(s) for s in config.seeds)} (mean ± sample std over seeds)")
    lines.append(
        f"- zero-shot CLIP: the class template {config.class_template!r}, no training; local "
        "accuracy scores each client's held-out split (over its own classes for FedTPG)"
    )
    return "\n".join(lines) + "\n\n"


def _backbone_note(runs: Sequence[RunValues]) -> str | None:
    """A demo backbone's note, as its runs' summaries record it."""
    for run in runs:
        summary = json.loads((run.folder / SUMMARY_FILE).read_text())
        backbone = summary.get("backbone")
        if isinstance(backbone, dict) and isinstance(backbone.get("note"), str):
            return backbone["note"]
    return None


def write_tables(
    config: ExperimentConfig, folder: Path, runs: Sequence[RunValues], rows: Sequence[dict]
) -> None:
    """``comparison.md`` (described, mean ± std), ``comparison.csv`` (means and stds, full precision)
    and ``runs.csv`` (every run's values)."""
    write_text_atomically(
        folder / f"{TABLE_FILE}.md",
        describe(config, runs) + comparison_table(rows, METHOD_TITLES, columns(runs)),
    )
    write_csv(rows, folder / f"{TABLE_FILE}.csv")
    write_csv(per_run_rows(runs), folder / RUNS_TABLE_FILE)


def write_plots(config: ExperimentConfig, folder: Path, runs: Sequence[RunValues]) -> list[Path]:
    """One PNG per metric of ``PLOTS`` (``DOMAIN_PLOTS`` across domains) with one curve per trained
    method (its mean over the seeds) per round and against the cumulative bytes (a log axis: methods
    send from kilobytes to megabytes a round), and zero-shot CLIP as a horizontal line."""
    from fedprompt.execution.plots import plot_runs

    records = {}
    floors: dict[str, dict[str, float]] = {}
    plots = DOMAIN_PLOTS if config.across_domains else PLOTS
    for method in config.methods:
        mine = [load_run(run.folder) for run in runs if run.method == method]
        if config.base_of(method) == ZERO_SHOT:
            for key, _ in plots:
                finals = [run.curve(key)[1][-1] for run in mine if run.curve(key)[0]]
                if finals:
                    floors.setdefault(key, {})[method] = sum(finals) / len(finals)
        else:
            records[method] = mean_record(method, mine)
    seeds = len(config.seeds)
    written = []
    for key, label in plots:
        shown = [record for record in records.values() if record.curve(key)[0]]
        if not shown and key not in floors:
            continue
        title = f"{config.name}: {label}" + (f", mean of {seeds} seeds" if seeds > 1 else "")
        out = folder / "plots" / f"{key}.png"
        written.append(plot_runs(shown, out, [(key, label)], floors.get(key), title, log_bytes=True))
    return written
