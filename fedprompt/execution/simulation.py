"""The in-process runtime: every client in one process, sharing one backbone, bytes passed in memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedprompt.config import ConfigError, RunConfig
from fedprompt.errors import NoClientTrainedError
from fedprompt.execution.acceptance import HeldOutAcceptance
from fedprompt.execution.metrics import RunRecorder, client_rows, evaluate_round, round_metrics
from fedprompt.execution.results import RunDirectory, RunResult
from fedprompt.federation.client_state import MemoryClientStates
from fedprompt.federation.privacy.stages import privacy_stages
from fedprompt.federation.server import AggregationStage, RoundRecord, Server
from fedprompt.federation.update_pipeline import ExampleBounds
from fedprompt.tasks.experiment import Experiment

log = logging.getLogger("fedprompt.simulation")


def make_server(experiment: Experiment, config: RunConfig, client_ids: Sequence[int] | None = None) -> Server:
    """The server for an experiment: its initial prompt, strategy, clients, update bounds and wire
    settings.

    ``client_ids`` defaults to the experiment's clients, whose training-set sizes then bound their
    aggregation weights; a server whose clients live in other processes (the Flower ServerApp)
    gives every partition id instead and knows only ``robustness.max_examples``.
    """
    known = experiment.example_counts() if client_ids is None else None
    return Server(
        experiment.initial_state(),
        experiment.strategy,
        list(experiment.clients) if client_ids is None else list(client_ids),
        fraction=config.federation.fraction,
        min_clients=config.federation.min_clients,
        seed=config.seed,
        wire_dtype=config.payload.wire_dtype,
        max_bytes=config.payload.max_bytes,
        example_bounds=ExampleBounds(
            known, config.robustness.max_examples, max_ratio=config.robustness.max_weight_ratio
        ),
        max_update_norm=config.robustness.max_update_norm,
        stages=build_stages(config, experiment),
        poisson_sampling=config.privacy.kind == "central" and config.privacy.sampling == "poisson",
        system_sampling=config.privacy.kind == "central" and config.privacy.noise_seed == "system",
    )


def check_in_process(config: RunConfig) -> None:
    """Refuse what only the Flower runtime does: secure aggregation (in one process the server
    holds every client's update anyway)."""
    if config.secure_aggregation.enabled:
        raise ConfigError(
            "secure_aggregation.enabled runs on the Flower runtime (fedprompt flower new-app); in one "
            "process the server holds every update anyway. Disable it for an in-process run"
        )


def run_in_process(
    experiment: Experiment, config: RunConfig, run_dir: RunDirectory | None = None
) -> RunResult:
    """Run every round in this process; resume from ``run_dir``'s checkpoint when it holds one."""
    check_in_process(config)
    server = make_server(experiment, config)
    states = experiment.client_states
    recorder = RunRecorder(config, run_dir, states if isinstance(states, MemoryClientStates) else None)
    rounds = config.federation.rounds
    if recorder.resume(server):
        log.info("resuming %s after round %d", run_dir.path if run_dir else "", server.completed_rounds)
        if recorder.pending is not None:  # released before the stop: evaluate it, never recompute it
            _record(experiment, server, config, recorder, server.completed_rounds, time.perf_counter())
    else:
        recorder.record_initial(*evaluate_round(experiment, server, config))

    with _progress(config.runtime.progress) as progress:
        round_task = progress.add_task("rounds", total=rounds, completed=server.completed_rounds)
        client_task = progress.add_task("clients", total=0)
        for round_num in range(server.completed_rounds + 1, rounds + 1):
            start = time.perf_counter()
            record = server.begin_round(round_num)
            progress.reset(client_task, total=len(record.sampled), description=f"round {round_num} clients")
            for cid in record.sampled:
                _fit_client(experiment, server, record, cid)
                progress.advance(client_task)
            if record.sampled and len(record.rejected) == len(record.sampled):
                raise NoClientTrainedError(
                    f"round {round_num}: every sampled client failed; first reason: "
                    f"{next(iter(record.rejected.values()))}"
                )
            server.aggregate(record)
            for cid in record.used:
                states.commit(cid, round_num)
            recorder.release(
                {"round": round_num, **round_metrics(server, record)}, client_rows(server, record), server
            )
            row = _record(experiment, server, config, recorder, round_num, start)
            progress.advance(round_task)
            log.info("round %d: %s", round_num, _brief(row))
    return recorder.finish(server, experiment.backbone_bytes, experiment.label_names, experiment.notes)


def _record(
    experiment: Experiment,
    server: Server,
    config: RunConfig,
    recorder: RunRecorder,
    round_num: int,
    start: float,
) -> dict[str, Any]:
    """Evaluate the released round ``round_num`` when due and record it; its row."""
    evaluated: dict[str, Any] = {}
    evaluations: list[dict[str, Any]] = []
    if round_num % config.federation.evaluate_every == 0 or round_num == config.federation.rounds:
        evaluated, evaluations = evaluate_round(experiment, server, config)
    evaluated = {**evaluated, "time_s": time.perf_counter() - start}
    return recorder.record_round(evaluated, evaluations, server)


def _fit_client(experiment: Experiment, server: Server, record: RoundRecord, cid: int) -> None:
    """One client's round trip on bytes; what it would carry forward is staged until the server
    uses its update. A client that raises is logged and left out of the round."""
    downlink = server.downlink(record.round, cid)
    instructions = server.instructions(record.round, cid)
    try:
        carried = experiment.client_states.resolve(cid, instructions.accepted_round)
        uplink, carry = experiment.clients[cid].fit_payload(
            downlink, server.downlink_spec, instructions, server.wire_dtype, carried
        )
    except Exception as exc:  # a failing client must not stop the round; say why it failed
        server.reject(record, cid, f"client failed: {type(exc).__name__}: {exc}")
        return
    experiment.client_states.stage(cid, record.round, carry)
    server.receive(record, cid, uplink)


def build_stages(config: RunConfig, experiment: Experiment) -> list[AggregationStage]:
    """The aggregation stages the configuration asks for: differential privacy's noise and
    accountant (``privacy``), then the held-out acceptance test (``federation.acceptance``)."""
    stages = privacy_stages(config)
    acceptance = config.federation.acceptance
    if acceptance is not None:
        stages.append(
            HeldOutAcceptance(
                experiment, acceptance.score, acceptance.tolerance, config.runtime.eval_batch_size
            )
        )
    return stages


def _brief(row: dict[str, Any]) -> str:
    keys = ("global_accuracy", "local_accuracy", "train_loss", "clients_accepted")
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )
    with progress:
        yield progress
