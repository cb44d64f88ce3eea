"""The Python API: as short as the command line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedprompt.config import RunConfig, load_config
from fedprompt.execution.results import CONFIG_HASH_KEY, RunDirectory, RunResult
from fedprompt.execution.simulation import check_in_process, run_in_process
from fedprompt.tasks.registry import build_experiment


def run(
    config: str | Path | Mapping[str, Any] | RunConfig | None = None,
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    write: bool = True,
    resume: str | Path | None = None,
) -> RunResult:
    """Run a federated job in this process and return its history and final prompt.

    ``config``: a YAML path, a mapping, a RunConfig, or None for the embedded default;
    ``overrides``: ``key=value`` strings as on the command line. ``write=False`` keeps
    everything in memory; ``resume`` continues the run folder given from its last complete round.
    The configuration is validated before any data or model loads.
    """
    if resume is not None:
        folder = RunDirectory.existing(Path(resume))
        stored = load_config(folder.read_config())
        cfg = load_config(stored, overrides)
        metadata = folder.checkpoint_metadata() or {}
        folder.check_resume(stored, cfg, metadata.get(CONFIG_HASH_KEY))
        check_in_process(cfg)
        return run_in_process(build_experiment(cfg), cfg, folder)
    cfg = load_config(config, overrides)
    check_in_process(cfg)  # before a run folder or a model
    if output_dir is not None:
        cfg.output.dir = Path(output_dir)
    experiment = build_experiment(cfg)  # a start that fails (data, model) leaves no results folder
    run_dir = RunDirectory.create(cfg.output.dir, cfg.name) if write else None
    if run_dir:
        run_dir.write_config(cfg)
    return run_in_process(experiment, cfg, run_dir)
