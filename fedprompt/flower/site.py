"""What a site does for a message, apart from Flower: the experiment it hosts, fit and evaluate.

The ClientApp runs these functions in its own process, or hands the message to the site's
long-lived worker (``fedprompt.flower.site_worker``), which runs the same functions; either way
the bytes that come back are the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedprompt.config import RunConfig
from fedprompt.experiment import Experiment, build_experiment
from fedprompt.flower.strategy import EVAL_WIRE_DTYPE
from fedprompt.payload import PayloadSpec, decode_state
from fedprompt.simulation import make_server
from fedprompt.training import FitInstructions

log = logging.getLogger("fedprompt.flower")


@dataclass
class HostedExperiment:
    """What a site keeps between messages: the experiment and the specs its payloads must meet."""

    config: RunConfig
    experiment: Experiment
    downlink_spec: PayloadSpec
    eval_spec: PayloadSpec

    @classmethod
    def build(cls, config: RunConfig) -> HostedExperiment:
        """Load the backbone and data of ``config`` and build every client of its partitioning.

        Every client is built (they share the one backbone, and the data are loaded and tokenised
        whole either way), so a process that serves several partitions holds one backbone.
        """
        backbone = config.backbone
        where = backbone.url if backbone.kind == "remote" else backbone.model
        log.info("building the experiment (backbone %s) for this process", where)
        experiment = build_experiment(config)
        return cls(
            config=config,
            experiment=experiment,
            downlink_spec=make_server(experiment, config).downlink_spec,
            eval_spec=PayloadSpec.for_state(
                experiment.model.prompt_state(), EVAL_WIRE_DTYPE, config.payload.max_bytes
            ),
        )


class ExperimentCache:
    """Owns at most one hosted experiment, the one of the last configuration asked for."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._hosted: HostedExperiment | None = None
        self.builds = 0

    def get(self, config: RunConfig) -> HostedExperiment:
        """The experiment for ``config``, built on first use and reused while the config is the same."""
        key = config.model_dump_json()
        if self._hosted is None or key != self._key:
            self._hosted = None  # let the old backbone go before the new one loads
            self._hosted, self._key = HostedExperiment.build(config), key
            self.builds += 1
        return self._hosted


def fit_partition(
    hosted: HostedExperiment, partition: int, instructions: FitInstructions, downlink: bytes
) -> bytes:
    """Partition ``partition``'s update (safetensors bytes) to the global state in ``downlink``."""
    return hosted.experiment.clients[partition].fit_payload(
        downlink, hosted.downlink_spec, instructions, hosted.config.payload.wire_dtype
    )


def evaluate_partition(hosted: HostedExperiment, partition: int, state: bytes) -> dict[str, float] | None:
    """The accuracy, loss and example count of the global state on the partition's held-out split
    (None when the partition has none)."""
    decoded, _ = decode_state(state, hosted.eval_spec)
    metrics = hosted.experiment.clients[partition].evaluate(decoded)
    if metrics is None:
        return None
    return {
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "num-examples": metrics["num_examples"],
    }
