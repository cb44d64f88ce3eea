"""What a site does for a message, apart from Flower: the experiment it hosts, fit and evaluate.

The ClientApp runs these functions in its own process, or hands the message to the site's
long-lived worker (``fedprompt.flower.site_worker``), which runs the same functions; either way
the bytes that come back are the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedprompt.config import RunConfig
from fedprompt.execution.metrics import evaluate_client
from fedprompt.execution.simulation import make_server
from fedprompt.federation.client_state import ClientStateError, ClientStateStore
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import PayloadSpec, decode_state
from fedprompt.federation.privacy.accounting import plan_privacy
from fedprompt.federation.privacy.ledger import LedgerRefusal, Release, SiteLedger
from fedprompt.federation.state import State
from fedprompt.flower.records import CLIENT_STATE_DIR
from fedprompt.flower.strategy import EVAL_WIRE_DTYPE
from fedprompt.tasks.experiment import Experiment
from fedprompt.tasks.registry import build_experiment

CLIENT_STATE_RESET = "client_state_reset"
"""Update metric of a client whose carried state this site had lost (it started afresh)."""

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
                experiment.initial_state(), EVAL_WIRE_DTYPE, config.payload.max_bytes
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
    hosted: HostedExperiment,
    partition: int,
    instructions: FitInstructions,
    downlink: bytes,
    states: ClientStateStore,
    ledger: SiteLedger,
) -> bytes:
    """Partition ``partition``'s update (safetensors bytes) to the global state in ``downlink``.

    The client starts from the state it carries since the round the server last used its update
    (``instructions.accepted_round``, committed here first); what it would carry forward is staged
    in ``states`` until a later round's instructions say the server used this update. Under secure
    aggregation or local DP the site's ``ledger`` first records the release (and refuses a second
    one for the round, or local DP over the site's budget: :class:`LedgerRefusal`).
    """
    record_release(hosted.config, partition, instructions.round, ledger)
    carried, reset = _carried(states, partition, instructions.accepted_round)
    uplink, carry = hosted.experiment.clients[partition].fit_payload(
        downlink,
        hosted.downlink_spec,
        instructions,
        hosted.config.payload.wire_dtype,
        carried,
        extra_metrics={CLIENT_STATE_RESET: 1.0} if reset else None,
    )
    states.stage(partition, instructions.round, carry)
    return uplink


def record_release(config: RunConfig, partition: int, round_num: int, ledger: SiteLedger) -> None:
    """Write this round's upload into the site's ledger before it is computed and sent: a masked
    input (secure aggregation) or a locally noised update (local DP, within the site's budget,
    which needs a ledger that outlives the run)."""
    plan = plan_privacy(config)
    local = plan is not None and plan.kind == "local"
    if local and not ledger.persistent:
        raise LedgerRefusal(
            "privacy.kind local: this site keeps the ε it spends in a ledger that must outlive the run; "
            f"start the SuperNode with --node-config \"... {CLIENT_STATE_DIR}='<folder>'\" (or the site "
            "worker with --state-dir)"
        )
    if local:  # first: its refusals (a second upload, the budget) must leave nothing recorded
        assert plan is not None
        privacy = config.privacy
        budget = privacy.site_epsilon_budget or privacy.target_epsilon
        release = Release(
            "local-dp", config.name, round_num, partition, plan.noise_multiplier, plan.rounds, plan.delta
        )
        spent = ledger.record(release, budget)
        log.info(
            "round %d: partition %d has spent ε=%.4g at δ=%g (budget %s)",
            round_num,
            partition,
            spent,
            plan.delta,
            budget,
        )
    if config.secure_aggregation.enabled:
        ledger.record(Release("masked", config.name, round_num, partition))


def _carried(states: ClientStateStore, partition: int, accepted_round: int) -> tuple[State, bool]:
    """(the client's carried state as of ``accepted_round``, whether it was lost and starts afresh).

    A site that lost a client's state (a SuperNode restarted without ``client-state-dir``) starts
    that client from the initial state rather than fail it every round; the update then reports
    ``client_state_reset`` so the server's clients.jsonl shows it.
    """
    try:
        return states.resolve(partition, accepted_round), False
    except ClientStateError as exc:
        log.warning("%s; client %d starts from its initial state", exc, partition)
        return {}, True


def evaluate_partition(
    hosted: HostedExperiment, partition: int, accepted_round: int, state: bytes, states: ClientStateStore
) -> dict[str, float] | None:
    """The partition's metrics on its held-out split (None when it has none) for the global state
    in ``state``: accuracy, loss and example count of the global prompt, and the personal and
    fine-tuned accuracies when the run has them."""
    decoded, _ = decode_state(state, hosted.eval_spec)
    carried, _ = _carried(states, partition, accepted_round)
    metrics = evaluate_client(hosted.experiment, partition, decoded, carried)
    if metrics is None:
        return None
    out = {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "num-examples": metrics["num_examples"]}
    for key in ("personal_accuracy", "finetuned_accuracy"):
        if key in metrics:
            out[key.replace("_", "-")] = metrics[key]
    return out
