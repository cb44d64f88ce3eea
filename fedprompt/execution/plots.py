"""Plots of one or several runs (matplotlib, Agg backend): accuracy per round, accuracy against the
bytes sent, and the privacy budget ε per round when a run has one."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedprompt.execution.report import ACCURACY_CURVES, RunRecord
from fedprompt.execution.results import PLOT_FILE

log = logging.getLogger("fedprompt.plots")

_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))
"""One line style per accuracy metric (global solid, local dashed, ...); one colour per run."""


def plot_runs(
    runs: Sequence[RunRecord],
    out: Path,
    curves: Sequence[tuple[str, str]] = ACCURACY_CURVES,
    references: Mapping[str, float] | None = None,
    title: str | None = None,
    log_bytes: bool = False,
) -> Path:
    """Write the runs' curves to ``out`` (PNG): each accuracy metric of ``curves`` ((history key,
    label) pairs; default: every one a run may record) that a run recorded, per round and against the
    cumulative bytes up and down; ε per round in a third panel when some run has it. ``references``
    draws each value as a labelled horizontal line on both accuracy panels (a floor, such as
    zero-shot accuracy). ``log_bytes`` puts the bytes on a log axis (runs whose traffic differs by
    orders of magnitude; the untrained round 0, at zero bytes, is then left off that panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    private = any(run.curve("epsilon")[0] for run in runs)
    panels = 3 if private else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    per_round, per_byte = axes[0][0], axes[0][1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        cumulative = run.cumulative_bytes()
        for number, (key, name) in enumerate(curves):
            rounds, values = run.curve(key)
            if not rounds:
                continue
            style = _STYLES[number % len(_STYLES)]
            label = run.label if len(curves) == 1 else name if len(runs) == 1 else f"{run.label}: {name}"
            per_round.plot(rounds, values, linestyle=style, marker=".", color=colour, label=label)
            sent = [
                (cumulative[r], v)
                for r, v in zip(rounds, values, strict=True)
                if cumulative[r] > 0 or not log_bytes
            ]
            if sent:
                xs, ys = zip(*sent, strict=True)
                per_byte.plot(xs, ys, linestyle=style, marker=".", color=colour)
        if private:
            rounds, values = run.curve("epsilon")
            if rounds:
                axes[0][2].plot(rounds, values, marker=".", color=colour, label=run.label)
    for number, (name, value) in enumerate((references or {}).items()):
        colour = colours[(len(runs) + number) % len(colours)]
        for axis in (per_round, per_byte):
            axis.axhline(value, color=colour, linestyle=":", label=name if axis is per_round else None)
    metric = curves[0][1] if len(curves) == 1 else "accuracy"
    per_round.set(xlabel="round", ylabel=metric, title=f"{metric} per round")
    per_byte.set(
        xlabel="bytes up + down, all clients, cumulative",
        ylabel=metric,
        title=f"{metric} against bytes sent",
    )
    if log_bytes:
        per_byte.set_xscale("log")
    per_byte.xaxis.set_major_formatter(EngFormatter(unit="B"))
    per_round.legend(fontsize="small")
    if private:
        axes[0][2].set(xlabel="round", ylabel="ε", title="privacy budget spent")
    for axis in axes[0]:
        axis.grid(alpha=0.3)
    for axis in (per_round, *axes[0][2:]):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title or (runs[0].label if len(runs) == 1 else f"{len(runs)} runs"))
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def save_run_plot(run: RunRecord, folder: Path) -> Path | None:
    """A finished run's ``plot.png`` in its folder; None, with a warning, without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("no %s in %s: matplotlib is not installed (pip install matplotlib)", PLOT_FILE, folder)
        return None
    return plot_runs([run], folder / PLOT_FILE)
