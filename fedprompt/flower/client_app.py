"""The fedprompt ClientApp: a SuperNode's side of a round, on fedprompt's own Client code.

Each SuperNode hosts one data partition, named by its ``--node-config "partition-id=<id>"``
(Flower's simulation sets it for each virtual node). The ClientApp answers three messages:

- query: which partition this node hosts (the ServerApp maps partitions to nodes with it);
- train: validate the downlink bytes, fit with fedprompt's ``Client.fit_payload``, reply with the
  update's safetensors bytes;
- evaluate: the global prompt's accuracy and loss on the partition's held-out split.

The experiment (frozen backbone, tokenised data, clients) is built once per process and kept in
a module-level cache keyed by the configuration, so a process that serves many messages (a
simulation worker, or any long-lived process) loads the backbone once. Flower's deployment
engine starts a fresh ``flwr-clientapp`` process for every message, in both SuperNode isolation
modes, so there the cache lives as long as one message (the README of an app that
``fedprompt flower new-app`` writes says what that costs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.config import ConfigError, RunConfig
from fedprompt.experiment import Experiment, build_experiment
from fedprompt.flower.app_config import AppSettings, load_app_config
from fedprompt.flower.records import (
    EVAL_RECORD,
    NODE_RECORD,
    NUM_PARTITIONS,
    PARTITION_ID,
    node_record,
    payload_content,
    read_instructions,
    read_payload,
)
from fedprompt.flower.strategy import EVAL_WIRE_DTYPE
from fedprompt.payload import PayloadError, PayloadSpec, decode_state
from fedprompt.simulation import make_server

log = logging.getLogger("fedprompt.flower")


@dataclass
class HostedExperiment:
    """What a client process keeps between messages: the experiment and the specs payloads meet."""

    config: RunConfig
    experiment: Experiment
    downlink_spec: PayloadSpec
    eval_spec: PayloadSpec


_CACHE: dict[str, HostedExperiment] = {}


def hosted_experiment(config: RunConfig) -> HostedExperiment:
    """The experiment for ``config``, built on first use in this process and reused afterwards.

    Every client of the partitioning is built (they share the one backbone, and the data are
    loaded and tokenised whole either way), so a process that serves several partitions, such
    as a simulation worker, still holds one backbone. A new configuration replaces the cached one.
    """
    key = config.model_dump_json()
    hosted = _CACHE.get(key)
    if hosted is None:
        _CACHE.clear()
        log.info("building the experiment (backbone %s) for this process", config.backbone.model)
        experiment = build_experiment(config)
        hosted = HostedExperiment(
            config=config,
            experiment=experiment,
            downlink_spec=make_server(experiment, config).downlink_spec,
            eval_spec=PayloadSpec.for_state(
                experiment.model.prompt_state(), EVAL_WIRE_DTYPE, config.payload.max_bytes
            ),
        )
        _CACHE[key] = hosted
    return hosted


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


def build_client_app(config_file: str | Path) -> ClientApp:
    """A Flower ClientApp that runs fedprompt clients configured by ``config_file`` (YAML)."""
    app = ClientApp()

    def setup(context: Context) -> tuple[RunConfig, int]:
        config = load_app_config(config_file, AppSettings.from_run_config(context.run_config))
        return config, partition_id(context, config)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        _, pid = setup(context)
        return Message(RecordDict({NODE_RECORD: node_record(pid)}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config, pid = setup(context)
        client_id, instructions = read_instructions(message.content)
        if client_id != pid:
            raise PayloadError(f"train message is for client {client_id}; this node hosts partition {pid}")
        hosted = hosted_experiment(config)
        uplink = hosted.experiment.clients[pid].fit_payload(
            read_payload(message.content, config.payload.max_bytes),
            hosted.downlink_spec,
            instructions,
            config.payload.wire_dtype,
        )
        return Message(payload_content(uplink), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        config, pid = setup(context)
        hosted = hosted_experiment(config)
        state, _ = decode_state(read_payload(message.content, config.payload.max_bytes), hosted.eval_spec)
        metrics = hosted.experiment.clients[pid].evaluate(state)
        record = MetricRecord(
            {}
            if metrics is None
            else {
                "accuracy": metrics["accuracy"],
                "loss": metrics["loss"],
                "num-examples": metrics["num_examples"],
            }
        )
        return Message(RecordDict({EVAL_RECORD: record}), reply_to=message)

    return app
