"""The fedprompt ClientApp: a SuperNode's side of a round, on fedprompt's own Client code.

Each SuperNode hosts one data partition, named by its ``--node-config "partition-id=<id>"``
(Flower's simulation sets it for each virtual node). The ClientApp answers three messages:

- query: which partition this node hosts and, with ``--node-config "... num-examples=<n>"``, how
  many training examples it declares (the ServerApp binds the partition to this node for the run,
  and bounds the client's aggregation weight by the count);
- train: validate the downlink bytes, fit with fedprompt's ``Client.fit_payload``, reply with the
  update's safetensors bytes; with secure aggregation, the four stages of a secure round instead
  (``fedprompt.flower.secure_client``: only a masked, quantised update leaves the site);
- evaluate: the global prompt's accuracy and loss on the partition's held-out split.

The experiment (frozen backbone, tokenised data, clients) is built once per process and kept
(``fedprompt.flower.site``), so a process that serves many messages (a simulation worker) loads
the backbone once. Flower's deployment engine starts a fresh ``flwr-clientapp`` process for every
message, in both SuperNode isolation modes; a SuperNode whose node config names a site worker
(``site-worker='<socket path>'``, see ``fedprompt.flower.site_worker``) has its ClientApp hand
train and evaluate messages to that long-lived process instead, so the site loads its backbone
once per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.config import ConfigError, RunConfig
from fedprompt.errors import PayloadError
from fedprompt.federation.instructions import FitInstructions
from fedprompt.flower.app_config import AppSettings, load_app_config
from fedprompt.flower.records import (
    CLIENT_STATE_DIR,
    EVAL_RECORD,
    NODE_RECORD,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    node_record,
    payload_content,
    read_evaluation_record,
    read_instructions,
    read_payload,
)
from fedprompt.flower.secure_records import SECAGG_RECORD
from fedprompt.flower.site_worker import SITE_WORKER, SiteWorkerClient

if TYPE_CHECKING:
    from fedprompt.federation.client_state import ClientStateStore
    from fedprompt.federation.privacy.ledger import SiteLedger
    from fedprompt.flower.site import ExperimentCache


class InProcessSite:
    """Does a site's work in this process, on the process's experiment cache (built on first use),
    with the clients' carried states in ``states`` and the site's ledger of releases in ``ledger``
    (both in the node's Flower context, or in a folder).

    The same two calls as :class:`SiteWorkerClient`, so the ClientApp does not care which it has.
    torch and the model code are imported on first use: a ClientApp that relays never imports them.
    """

    _cache: ExperimentCache | None = None

    def __init__(self, states: ClientStateStore, ledger: SiteLedger) -> None:
        self.states = states
        self.ledger = ledger

    @classmethod
    def cache(cls) -> ExperimentCache:
        """The experiment cache this process shares between messages."""
        if InProcessSite._cache is None:
            from fedprompt.flower.site import ExperimentCache

            InProcessSite._cache = ExperimentCache()
        return InProcessSite._cache

    def fit(self, config: RunConfig, partition: int, instructions: FitInstructions, downlink: bytes) -> bytes:
        from fedprompt.flower.site import fit_partition

        return fit_partition(
            self.cache().get(config), partition, instructions, downlink, self.states, self.ledger
        )

    def evaluate(
        self, config: RunConfig, partition: int, accepted_round: int, state: bytes
    ) -> dict[str, float] | None:
        from fedprompt.flower.site import evaluate_partition

        return evaluate_partition(self.cache().get(config), partition, accepted_round, state, self.states)


def partition_id(context: Context, config: RunConfig) -> int:
    """The partition (fedprompt client id) the node hosts, from its node config, checked."""
    pid = context.node_config.get(PARTITION_ID)
    num_clients = config.partition.num_clients
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ConfigError(
            f"node config {PARTITION_ID!r} is {pid!r}; start the SuperNode with "
            f"--node-config '{PARTITION_ID}=<0..{num_clients - 1}>'"
        )
    num_partitions = context.node_config.get(NUM_PARTITIONS, num_clients)
    if num_partitions != num_clients:
        raise ConfigError(
            f"the federation has {NUM_PARTITIONS}={num_partitions} but partition.num_clients is "
            f"{num_clients}; give the simulation {num_clients} SuperNodes or change partition.num_clients"
        )
    if not 0 <= pid < num_clients:
        raise ConfigError(f"node config {PARTITION_ID}={pid} is outside 0..{num_clients - 1}")
    return pid


def declared_examples(context: Context) -> int | None:
    """The training-example count the node config declares for its partition (``num-examples``),
    or None; the server bounds the client's aggregation weight by it for the whole run."""
    count = context.node_config.get(NUM_EXAMPLES)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(
            f"node config {NUM_EXAMPLES!r} is {count!r}; give the partition's number of training "
            f"examples as a positive integer, e.g. --node-config '{PARTITION_ID}=0 {NUM_EXAMPLES}=5000'"
        )
    return count


def site_for(context: Context, settings: AppSettings) -> SiteWorkerClient | InProcessSite:
    """The site worker the node config names, or this process when it names none (its clients'
    carried states then live in the node's Flower context, or in ``client-state-dir``)."""
    path = context.node_config.get(SITE_WORKER)
    if path is None:
        folder = context.node_config.get(CLIENT_STATE_DIR)
        if folder is None:
            from fedprompt.flower.context_states import ContextClientStates, ContextLedger

            return InProcessSite(ContextClientStates(context.state), ContextLedger(context.state))
        if not isinstance(folder, str) or not folder:
            raise ConfigError(
                f"node config {CLIENT_STATE_DIR!r} is {folder!r}; give a folder path as a string"
            )
        from fedprompt.federation.client_state import DirectoryClientStates
        from fedprompt.federation.privacy.ledger import FileLedger

        return InProcessSite(DirectoryClientStates(folder), FileLedger(folder))
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"node config {SITE_WORKER!r} is {path!r}; give the worker's socket path as a quoted string, "
            f"e.g. --node-config \"{PARTITION_ID}=0 {SITE_WORKER}='/run/fedprompt/site.sock'\""
        )
    return SiteWorkerClient(path, timeout=settings.round_timeout)


def build_client_app(config_file: str | Path) -> ClientApp:
    """A Flower ClientApp that runs fedprompt clients configured by ``config_file`` (YAML)."""
    app = ClientApp()

    def setup(context: Context) -> tuple[RunConfig, int, SiteWorkerClient | InProcessSite]:
        settings = AppSettings.from_run_config(context.run_config)
        config = load_app_config(config_file, settings)
        return config, partition_id(context, config), site_for(context, settings)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        _, pid, _ = setup(context)
        record = node_record(pid, declared_examples(context))
        return Message(RecordDict({NODE_RECORD: record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config, pid, site = setup(context)
        if SECAGG_RECORD in message.content.config_records:
            from fedprompt.flower.secure_client import answer_stage

            return Message(answer_stage(message.content, context, config, pid, site), reply_to=message)
        if config.secure_aggregation.enabled:
            raise PayloadError(
                "this site sends its update only through secure aggregation (secure_aggregation.enabled "
                "in its configuration); the server sent a plain train message"
            )
        client_id, instructions = read_instructions(message.content)
        if client_id != pid:
            raise PayloadError(f"train message is for client {client_id}; this node hosts partition {pid}")
        uplink = site.fit(config, pid, instructions, read_payload(message.content, config.payload.max_bytes))
        return Message(payload_content(uplink), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        config, pid, site = setup(context)
        client_id, accepted_round = read_evaluation_record(message.content)
        if client_id != pid:
            raise PayloadError(f"evaluate message is for client {client_id}; this node hosts partition {pid}")
        state = read_payload(message.content, config.payload.max_bytes)
        metrics = site.evaluate(config, pid, accepted_round, state)
        return Message(RecordDict({EVAL_RECORD: MetricRecord(metrics or {})}), reply_to=message)

    return app
