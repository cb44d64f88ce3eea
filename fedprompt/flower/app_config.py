"""What a fedprompt Flower app reads at run time: the fedprompt configuration and Flower's run config.

The fedprompt configuration is the YAML file that ships inside the Flower app (``fedprompt.yaml``,
beside the app's ``pyproject.toml``), so the ServerApp and every ClientApp build the same
experiment. Flower's run config (``[tool.flwr.app.config]``, overridable with
``flwr run --run-config``) holds what only the Flower runtime needs:

- ``fedprompt-overrides``: fedprompt ``key=value`` overrides separated by spaces, applied by the
  ServerApp and every ClientApp (e.g. ``"federation.rounds=3 seed=1"``). Only the fields of
  :data:`SERVER_OVERRIDABLE` may be overridden: what a site loads, where it writes, what it keeps
  local or private (backbone, URLs, token variables, data, partitioning, prompt, runtime, output,
  payload limits, personalisation, secure aggregation) is the app's ``fedprompt.yaml``, which every
  site reviews; an override of anything else is refused, naming the field;
- ``round-timeout``: seconds the ServerApp waits for the replies of one round (train or evaluate);
- ``node-wait-timeout``: seconds it waits at the start for one SuperNode per partition;
- ``results-dir``: the folder that receives the run folder (as ``fedprompt run`` writes it);
- ``resume``: a run folder to continue from its last complete round ("" for a new run);
- ``node-keys``: a JSON file naming each partition's registered SuperNode public key (``{"0":
  "ecdsa-sha2-nistp384 AAAA...", ...}``, the OpenSSH line ``flwr supernode register`` took), so a
  partition is bound to that key only; required with differential privacy or secure aggregation
  (``trust-on-first-use`` accepts the first node that claims each partition, asked for by name).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprompt.config import ConfigError, RunConfig, load_config

CONFIG_FILE_NAME = "fedprompt.yaml"
"""The fedprompt configuration's file name inside a Flower app."""
SERVER_OVERRIDABLE = ("name", "seed", "federation", "optimizer", "strategy", "robustness")
"""Top-level fields and sections that ``fedprompt-overrides`` may change: how the federation
learns (rounds, sampling, the local optimiser, the aggregation rule, the server's update bounds),
never what a site must decide for itself."""


@dataclass(frozen=True)
class AppSettings:
    """The Flower run-config values of a fedprompt app, validated."""

    overrides: tuple[str, ...] = ()
    round_timeout: float = 600.0
    node_wait_timeout: float = 300.0
    results_dir: Path = Path("runs")
    resume: Path | None = None
    node_keys: str | None = None
    """A node-keys file, ``trust-on-first-use``, or None (the default: trust on first use for plain
    runs, refused with privacy or secure aggregation)."""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Read and check the known keys; a bad value raises ConfigError naming the key."""
        overrides = tuple(shlex.split(_typed(run_config, "fedprompt-overrides", str, "")))
        resume = _typed(run_config, "resume", str, "")
        node_keys = _typed(run_config, "node-keys", str, "")
        return cls(
            overrides=overrides,
            round_timeout=_positive(run_config, "round-timeout", cls.round_timeout),
            node_wait_timeout=_positive(run_config, "node-wait-timeout", cls.node_wait_timeout),
            results_dir=Path(_typed(run_config, "results-dir", str, str(cls.results_dir))),
            resume=Path(resume) if resume else None,
            node_keys=node_keys or None,
        )


def check_overrides(overrides: tuple[str, ...]) -> None:
    """Refuse an override of a field outside :data:`SERVER_OVERRIDABLE`, before anything loads."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        section = key.split(".")[0]
        if section not in SERVER_OVERRIDABLE:
            raise ConfigError(
                f"run config 'fedprompt-overrides' may not change {key!r}: a site decides its "
                f"{section!r} itself, in the app's {CONFIG_FILE_NAME}. A server may override only "
                f"{', '.join(SERVER_OVERRIDABLE)} (and the fields under them)"
            )


def load_app_config(config_file: str | Path, settings: AppSettings) -> RunConfig:
    """The fedprompt configuration of an app: its YAML file with the run's overrides applied, after
    checking that each override is one a server may make, and that it asks for nothing that is
    safe only in a simulation (:func:`check_deployable`)."""
    check_overrides(settings.overrides)
    config = load_config(Path(config_file), settings.overrides)
    check_deployable(config)
    return config


def check_deployable(config: RunConfig) -> None:
    """Refuse on Flower what only a simulation may do: differential privacy whose noise derives from
    the configuration (``privacy.noise_seed: reproducible-insecure``), which every site holds, and
    local DP without a budget for the sites' ledgers."""
    privacy = config.privacy
    if privacy.kind != "none" and privacy.noise_seed == "reproducible-insecure":
        raise ConfigError(
            "privacy.noise_seed: reproducible-insecure derives the noise from the configuration, which "
            "every site holds, so anyone could subtract it; it is for in-process simulations only. On "
            "Flower set privacy.noise_seed: system (the default)"
        )
    if privacy.kind == "local" and privacy.target_epsilon is None and privacy.site_epsilon_budget is None:
        raise ConfigError(
            "privacy.kind local on Flower: each site refuses uploads beyond its budget, over every run its "
            "ledger records; set privacy.site_epsilon_budget (or privacy.target_epsilon, its default)"
        )


def _typed(run_config: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = run_config.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"run config {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _positive(run_config: Mapping[str, Any], key: str, default: float) -> float:
    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"run config {key!r} must be a positive number of seconds, got {value!r}")
    return float(value)
