"""A run's results folder and the result object a run returns."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from fedprompt.config import ConfigError, RunConfig
from fedprompt.errors import RunFolderError
from fedprompt.federation.state import State
from fedprompt.files import (
    append_json_lines,
    read_json_lines,
    rewrite_json_lines,
    write_atomically,
    write_text_atomically,
)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CLIENTS_FILE = "clients.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
FINAL_PROMPT_FILE = "final_prompt.safetensors"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "plot.png"
RESUMES_FILE = "resumes.jsonl"
CONFIG_HASH_KEY = "fedprompt.config_hash"

RESUMABLE_CHANGES = ("federation.rounds", "runtime.progress", "runtime.device", "output.dir")
"""Fields a resume may change: they do not change what the rounds already run would have computed."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_fingerprint(config: RunConfig | dict[str, Any]) -> str:
    """A hash of the resolved configuration (or of a run folder's config.yaml as written), leaving
    out what a resume may change."""
    raw = config if isinstance(config, dict) else config.model_dump(mode="json")
    kept = {key: value for key, value in _flatten(raw).items() if key not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def config_changes(before: RunConfig, after: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (before, after) for every field that differs."""
    old, new = _flatten(before.model_dump(mode="json")), _flatten(after.model_dump(mode="json"))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


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
        write_text_atomically(self.path / CONFIG_FILE, text)

    def check_resume(self, stored: RunConfig, resumed: RunConfig, checkpoint_hash: str | None) -> None:
        """Refuse a resume whose configuration differs from the run's in a field a resume may not
        change (the checkpoint's config hash, and the stored config.yaml, say what the run was);
        record the changes a resume may make (more rounds) in config.yaml and resumes.jsonl.

        The hash is checked against the configuration as read today and against config.yaml as
        written: a folder written by an earlier release (fewer fields, or a value since renamed,
        such as ``privacy.noise_seed: run``) still resumes, and any edit of it is still refused."""
        known = (config_fingerprint(stored), config_fingerprint(self.read_config()))
        if checkpoint_hash is not None and checkpoint_hash not in known:
            raise ConfigError(
                f"resume: {self.path / CONFIG_FILE} was changed after the checkpoint was written (its hash "
                "no longer matches); restore the run's config.yaml"
            )
        changes = config_changes(stored, resumed)
        forbidden = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
        if forbidden:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in forbidden.items()))
            raise ConfigError(
                f"resume: the configuration differs from the run's in fields a resume may not change "
                f"({listed}); only {', '.join(RESUMABLE_CHANGES)} may change. Start a new run instead"
            )
        if changes:
            self.write_config(resumed)
            when = time.strftime("%Y-%m-%dT%H:%M:%S")
            entry = {"time": when, "changes": {k: list(v) for k, v in changes.items()}}
            append_json_lines(self.path / RESUMES_FILE, [entry])

    def read_config(self) -> dict[str, Any]:
        """The resolved configuration the run wrote; RunFolderError when the folder is not a run's."""
        self.check_is_run()
        return yaml.safe_load((self.path / CONFIG_FILE).read_text())

    def append(self, file: str, rows: list[dict[str, Any]]) -> None:
        """Append rows and fsync them."""
        append_json_lines(self.path / file, rows)

    def read(self, file: str) -> list[dict[str, Any]]:
        """The rows of a JSON-lines file of the folder; a torn last line is skipped."""
        return read_json_lines(self.path / file)

    def truncate_after(self, file: str, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (left by a run that stopped mid-round), and a
        torn last line, atomically."""
        rewrite_json_lines(self.path / file, [r for r in self.read(file) if r["round"] <= last_round])

    def save_checkpoint(self, tensors: State, metadata: dict[str, str]) -> None:
        """Write atomically and durably: a crash mid-write leaves the previous checkpoint intact."""
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        write_atomically(
            self.path / CHECKPOINT_FILE, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata)
        )

    def checkpoint_metadata(self) -> dict[str, str] | None:
        """The checkpoint's metadata (round, config hash, ...) without loading its tensors."""
        file = self.path / CHECKPOINT_FILE
        if not file.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return handle.metadata() or {}

    def load_checkpoint(self) -> tuple[State, dict[str, str]] | None:
        metadata = self.checkpoint_metadata()
        if metadata is None:
            return None
        return load_file(str(self.path / CHECKPOINT_FILE)), metadata

    def save_final(self, state: State) -> None:
        contiguous = {k: v.contiguous() for k, v in state.items()}
        write_atomically(self.path / FINAL_PROMPT_FILE, lambda tmp: save_file(contiguous, str(tmp)))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomically(self.path / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


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
