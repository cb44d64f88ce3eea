"""The fedprompt ServerApp: the in-process runtime's rounds, with Flower carrying the bytes.

``run_server`` is ``run_in_process`` with the clients in other processes: the same Server
(seeded sampling, downlink, validation, aggregation in client-id order, checkpoint), the same
global evaluation on the server's held-out data, the same results folder, so a configuration
and seed give the same global prompt on either runtime. Before the first round the ServerApp
asks every SuperNode which partition it hosts and waits (``node-wait-timeout``) until each
partition of the run has one; nodes that join later are asked at the start of each round. Each
partition stays bound to the node that first claimed it (``fedprompt.flower.bindings``), kept in
the run folder so that a resumed run keeps the bindings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedprompt.config import ConfigError, RunConfig, load_config
from fedprompt.execution.metrics import RunRecorder, client_rows, evaluate_global, round_metrics
from fedprompt.execution.results import CONFIG_HASH_KEY, RunDirectory, RunResult
from fedprompt.execution.simulation import make_server
from fedprompt.flower.app_config import AppSettings, load_app_config
from fedprompt.flower.bindings import BINDINGS_FILE, TRUST_ON_FIRST_USE, PartitionBindings, load_node_keys
from fedprompt.flower.rounds import note_uploads, uploads_round
from fedprompt.flower.strategy import FedPromptStrategy
from fedprompt.tasks.experiment import Experiment
from fedprompt.tasks.registry import build_experiment

log = logging.getLogger("fedprompt.flower")

ABANDONED = (
    "round abandoned: its uploads (masked inputs, locally noised updates) were asked for before the "
    "ServerApp stopped, and each site's ledger answers a round once (a second answer over other "
    "participants would expose an update, or spend privacy twice)"
)


def build_server_app(config_file: str | Path) -> ServerApp:
    """A Flower ServerApp that runs the fedprompt job configured by ``config_file`` (YAML)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = AppSettings.from_run_config(context.run_config)
        config = load_app_config(config_file, settings)
        result = run_server(grid, config, settings)
        log.warning("fedprompt run finished: %s (results: %s)", result.summary, result.run_dir)

    return app


def run_server(
    grid: Grid, config: RunConfig, settings: AppSettings, experiment: Experiment | None = None
) -> RunResult:
    """Run every round through ``grid``; write the run folder under ``settings.results_dir``.

    ``experiment`` (built here when None, with no clients: the backbone and the server's test
    data) serves the global evaluation. ``settings.resume`` continues that run folder.
    """
    if settings.resume is not None:  # before anything loads: a resume may not change the run
        folder = RunDirectory(settings.resume)
        metadata = folder.checkpoint_metadata() or {}
        folder.check_resume(load_config(folder.read_config()), config, metadata.get(CONFIG_HASH_KEY))
    pinned = node_keys(config, settings)
    if experiment is None:
        experiment = build_experiment(config, client_ids=[])
    server = make_server(experiment, config, range(config.partition.num_clients))
    rounds = config.federation.rounds
    bindings = None
    if settings.resume is not None and (settings.resume / BINDINGS_FILE).is_file():
        robustness = config.robustness
        bindings = PartitionBindings.load(
            settings.resume / BINDINGS_FILE, robustness.max_examples, robustness.max_weight_ratio, pinned
        )
    elif pinned is not None:
        bindings = PartitionBindings(
            config.robustness.max_examples, config.robustness.max_weight_ratio, pinned
        )
    strategy = FedPromptStrategy(
        server,
        num_rounds=rounds,
        evaluate_every=config.federation.evaluate_every,
        local_evaluation=config.federation.local_evaluation,
        message_ttl=settings.round_timeout,
        bindings=bindings,
        secure=config.secure_aggregation,
    )
    strategy.summary()
    strategy.map_nodes(
        grid,
        wait_for=config.partition.num_clients,
        timeout=settings.node_wait_timeout,
        reply_timeout=settings.round_timeout,
    )

    if settings.resume is not None:
        recorder = RunRecorder(config, RunDirectory(settings.resume))
        if not recorder.resume(server):
            raise FileNotFoundError(f"resume: {settings.resume} holds no checkpoint to continue from")
        strategy.bindings.attach(settings.resume / BINDINGS_FILE)
        log.info("resuming %s after round %d", settings.resume, server.completed_rounds)
        if recorder.pending is not None:  # released before the stop: evaluate it, never recompute it
            _record(grid, experiment, strategy, config, settings, recorder, time.perf_counter())
    else:
        run_dir = RunDirectory.create(settings.results_dir, config.name)
        run_dir.write_config(config)
        strategy.bindings.attach(run_dir.path / BINDINGS_FILE)
        recorder = RunRecorder(config, run_dir)
        recorder.record_initial(*_evaluate(grid, experiment, strategy, config, settings, 0))

    folder = settings.resume if settings.resume is not None else recorder.run_dir.path
    asked_before = uploads_round(folder) if settings.resume is not None else None
    if config.secure_aggregation.enabled or config.privacy.kind == "local":  # sites answer once a round
        strategy.before_uploads = lambda r: note_uploads(folder, r)
    for round_num in range(server.completed_rounds + 1, rounds + 1):
        start = time.perf_counter()
        if round_num == asked_before:  # its uploads were asked for before the stop; never twice
            record = server.skip_round(round_num, ABANDONED)
            recorder.release({"round": round_num, **round_metrics(server, record)}, [], server)
            recorder.record_round({"time_s": time.perf_counter() - start}, [], server)
            continue
        strategy.map_nodes(grid, wait_for=0, timeout=0, reply_timeout=settings.round_timeout)  # new nodes
        record = strategy.train_round(grid, round_num, settings.round_timeout)
        recorder.release(
            {"round": round_num, **round_metrics(server, record)}, client_rows(server, record), server
        )
        row = _record(grid, experiment, strategy, config, settings, recorder, start)
        log.info("round %d: %s", round_num, row)
    notes = dict(experiment.notes)
    if config.privacy.kind != "none" or config.secure_aggregation.enabled:
        notes["node_binding"] = "registered keys (node-keys)" if pinned is not None else TRUST_ON_FIRST_USE
    return recorder.finish(server, experiment.backbone_bytes, experiment.label_names, notes)


def node_keys(config: RunConfig, settings: AppSettings) -> dict[int, bytes] | None:
    """Each partition's registered SuperNode key from the run config ``node-keys`` (None: trust on
    first use); with differential privacy or secure aggregation a key file is required, or trust on
    first use asked for by name (ConfigError before anything loads)."""
    guarded = config.privacy.kind != "none" or config.secure_aggregation.enabled
    if settings.node_keys is None:
        if guarded:
            raise ConfigError(
                "differential privacy and secure aggregation need SuperNode authentication, so that no node "
                "can squat a partition: start flower-superlink with --enable-supernode-auth, register each "
                "site's key (flwr supernode register), and name them in the run config node-keys (a JSON "
                f"file: partition -> OpenSSH public key); or set node-keys='{TRUST_ON_FIRST_USE}' to bind "
                "each partition to the first node that claims it"
            )
        return None
    if settings.node_keys == TRUST_ON_FIRST_USE:
        if guarded:
            log.warning("node-keys %s: the first node to claim a partition keeps it", TRUST_ON_FIRST_USE)
        return None
    try:
        keys = load_node_keys(settings.node_keys)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    missing = sorted(set(range(config.partition.num_clients)) - set(keys))
    if missing:
        raise ConfigError(f"node-keys {settings.node_keys} names no key for partitions {missing}")
    return keys


def _record(
    grid: Grid,
    experiment: Experiment,
    strategy: FedPromptStrategy,
    config: RunConfig,
    settings: AppSettings,
    recorder: RunRecorder,
    start: float,
) -> dict[str, Any]:
    """Evaluate the round the recorder released (when due) and record it; its row."""
    round_num = strategy.server.completed_rounds
    evaluated: dict[str, Any] = {}
    evaluations: list[dict[str, Any]] = []
    if strategy.evaluation_due(round_num):
        evaluated, evaluations = _evaluate(grid, experiment, strategy, config, settings, round_num)
    return recorder.record_round(
        {**evaluated, "time_s": time.perf_counter() - start}, evaluations, strategy.server
    )


def _evaluate(
    grid: Grid,
    experiment: Experiment,
    strategy: FedPromptStrategy,
    config: RunConfig,
    settings: AppSettings,
    round_num: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Global metrics on the server's test data, then the clients' local metrics through Flower:
    (the round's row, one row per client evaluated)."""
    row = evaluate_global(experiment, strategy.server.global_state, config)
    messages = strategy.configure_evaluate(round_num, strategy.global_arrays(), ConfigRecord(), grid)
    if not messages:
        return row, []
    replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
    local = strategy.aggregate_evaluate(round_num, replies)
    if local is not None:
        row.update({key: float(value) for key, value in local.items()})
    return row, strategy.last_evaluations
