"""A run's results folder and the result object a run returns."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from fedprompt.config import RunConfig
from fedprompt.errors import RunFolderError
from fedprompt.state import State

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CLIENTS_FILE = "clients.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
FINAL_PROMPT_FILE = "final_prompt.safetensors"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "plot.png"


class RunDirectory:
    """Owns a run's results folder: the resolved config, per-round metrics (JSONL), per-client
    records (JSONL), the checkpoint of the last complete round, the final prompt, a summary."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, base: Path, name: str) -> RunDirectory:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(base) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(base) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def existing(cls, path: Path) -> RunDirectory:
        """A results folder that a run wrote (it holds the run's config); RunFolderError otherwise."""
        folder = cls(path)
        folder.check_is_run()
        return folder

    def check_is_run(self) -> None:
        """RunFolderError unless this folder holds a run's config."""
        if not (self.path / CONFIG_FILE).is_file():
            what = "does not exist" if not self.path.exists() else f"has no {CONFIG_FILE}"
            raise RunFolderError(f"{str(self.path)!r} is not a fedprompt run folder: it {what}")

    def write_config(self, config: RunConfig) -> None:
        text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        (self.path / CONFIG_FILE).write_text(text)

    def read_config(self) -> dict[str, Any]:
        """The resolved configuration the run wrote; RunFolderError when the folder is not a run's."""
        self.check_is_run()
        return yaml.safe_load((self.path / CONFIG_FILE).read_text())

    def append(self, file: str, rows: list[dict[str, Any]]) -> None:
        with (self.path / file).open("a") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")

    def read(self, file: str) -> list[dict[str, Any]]:
        target = self.path / file
        if not target.is_file():
            return []
        return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]

    def truncate_after(self, file: str, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (left by a run that stopped mid-round)."""
        rows = [r for r in self.read(file) if r["round"] <= last_round]
        (self.path / file).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, tensors: State, metadata: dict[str, str]) -> None:
        """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
        tmp = self.path / (CHECKPOINT_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, self.path / CHECKPOINT_FILE)

    def load_checkpoint(self) -> tuple[State, dict[str, str]] | None:
        file = self.path / CHECKPOINT_FILE
        if not file.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(file)), metadata

    def save_final(self, state: State) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(self.path / FINAL_PROMPT_FILE))

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


@dataclass
class RunResult:
    """What a run leaves: the config it ran, the per-round history (round 0 is the initial
    prompt), per-client records, the final global prompt, and its results folder."""

    config: RunConfig
    history: list[dict[str, Any]]
    client_history: list[dict[str, Any]]
    final_state: State
    run_dir: Path | None
    backbone_bytes: int
    summary: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> list[float]:
        """One metric across rounds, e.g. ``result.metric("global_accuracy")``."""
        return [row[name] for row in self.history if name in row]
