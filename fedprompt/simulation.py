"""The in-process runtime: every client in one process, sharing one backbone, bytes passed in memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedprompt.config import RunConfig
from fedprompt.experiment import Experiment
from fedprompt.metrics import RunRecorder, client_rows, evaluate_round, round_metrics
from fedprompt.results import RunDirectory, RunResult
from fedprompt.server import RoundRecord, Server

log = logging.getLogger("fedprompt.simulation")


def make_server(experiment: Experiment, config: RunConfig, client_ids: Sequence[int] | None = None) -> Server:
    """The server for an experiment: its initial prompt, strategy, clients and wire settings.

    ``client_ids`` defaults to the experiment's clients; a server whose clients live in other
    processes (the Flower ServerApp) gives every partition id instead.
    """
    return Server(
        experiment.model.prompt_state(),
        experiment.strategy,
        list(experiment.clients) if client_ids is None else list(client_ids),
        fraction=config.federation.fraction,
        min_clients=config.federation.min_clients,
        seed=config.seed,
        wire_dtype=config.payload.wire_dtype,
        max_bytes=config.payload.max_bytes,
    )


def run_in_process(
    experiment: Experiment, config: RunConfig, run_dir: RunDirectory | None = None
) -> RunResult:
    """Run every round in this process; resume from ``run_dir``'s checkpoint when it holds one."""
    server = make_server(experiment, config)
    recorder = RunRecorder(config, run_dir)
    if recorder.resume(server):
        log.info("resuming %s after round %d", run_dir.path if run_dir else "", server.completed_rounds)
    else:
        recorder.record_initial(evaluate_round(experiment, server, config))

    rounds = config.federation.rounds
    with _progress(config.runtime.progress) as progress:
        round_task = progress.add_task("rounds", total=rounds, completed=server.completed_rounds)
        client_task = progress.add_task("clients", total=0)
        for round_num in range(server.completed_rounds + 1, rounds + 1):
            start = time.perf_counter()
            record = RoundRecord(round_num, server.sample(round_num))
            progress.reset(client_task, total=len(record.sampled), description=f"round {round_num} clients")
            for cid in record.sampled:
                _fit_client(experiment, server, record, cid)
                progress.advance(client_task)
            if len(record.rejected) == len(record.sampled):
                raise RuntimeError(
                    f"round {round_num}: every sampled client failed; first reason: "
                    f"{next(iter(record.rejected.values()))}"
                )
            server.aggregate(record)
            row = {"round": round_num, **round_metrics(server, record)}
            if round_num % config.federation.evaluate_every == 0 or round_num == rounds:
                row.update(evaluate_round(experiment, server, config))
            row["time_s"] = time.perf_counter() - start
            recorder.record_round(row, client_rows(server, record), server)
            progress.advance(round_task)
            log.info("round %d: %s", round_num, _brief(row))
    return recorder.finish(server, experiment.backbone_bytes, experiment.notes)


def _fit_client(experiment: Experiment, server: Server, record: RoundRecord, cid: int) -> None:
    """One client's round trip on bytes. A client that raises is logged and left out of the round."""
    downlink = server.downlink(record.round, cid)
    try:
        uplink = experiment.clients[cid].fit_payload(
            downlink, server.downlink_spec, server.instructions(record.round, cid), server.wire_dtype
        )
    except Exception as exc:  # a failing client must not stop the round; say why it failed
        server.reject(record, cid, f"client failed: {type(exc).__name__}: {exc}")
        return
    server.receive(record, cid, uplink)


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
