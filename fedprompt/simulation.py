"""The in-process runtime: every client in one process, sharing one backbone, bytes passed in memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedprompt.config import RunConfig
from fedprompt.experiment import Experiment
from fedprompt.results import CLIENTS_FILE, METRICS_FILE, RunDirectory, RunResult
from fedprompt.server import RoundRecord, Server
from fedprompt.training import evaluate

log = logging.getLogger("fedprompt.simulation")


def make_server(experiment: Experiment, config: RunConfig) -> Server:
    """The server for an experiment: its initial prompt, strategy, clients and wire settings."""
    return Server(
        experiment.model.prompt_state(),
        experiment.strategy,
        list(experiment.clients),
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
    history: list[dict[str, Any]] = []
    client_rows: list[dict[str, Any]] = []
    checkpoint = run_dir.load_checkpoint() if run_dir else None
    if checkpoint is not None and run_dir is not None:
        server.restore(*checkpoint)
        for file in (METRICS_FILE, CLIENTS_FILE):
            run_dir.truncate_after(file, server.completed_rounds)
        history, client_rows = run_dir.read(METRICS_FILE), run_dir.read(CLIENTS_FILE)
        log.info("resuming %s after round %d", run_dir.path, server.completed_rounds)
    else:
        history.append({"round": 0, **_evaluate_round(experiment, server, config)})
        if run_dir:
            run_dir.append(METRICS_FILE, history)

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
            rows = _client_rows(server, record)
            row = {"round": round_num, **_round_metrics(server, record)}
            if round_num % config.federation.evaluate_every == 0 or round_num == rounds:
                row.update(_evaluate_round(experiment, server, config))
            row["time_s"] = time.perf_counter() - start
            history.append(row)
            client_rows.extend(rows)
            if run_dir:
                run_dir.append(METRICS_FILE, [row])
                run_dir.append(CLIENTS_FILE, rows)
                run_dir.save_checkpoint(*server.checkpoint())
            progress.advance(round_task)
            log.info("round %d: %s", round_num, _brief(row))

    result = RunResult(
        config=config,
        history=history,
        client_history=client_rows,
        final_state=server.global_state,
        run_dir=run_dir.path if run_dir else None,
        backbone_bytes=experiment.backbone_bytes,
    )
    result.summary = summarize(result)
    if run_dir:
        run_dir.save_final(server.global_state)
        run_dir.write_summary(result.summary)
    return result


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


def _evaluate_round(experiment: Experiment, server: Server, config: RunConfig) -> dict[str, float]:
    """Global metrics on the server's test set, and (optionally) local metrics on each client's split."""
    experiment.model.load_state_dict(server.global_state, strict=True)
    test = evaluate(experiment.model, experiment.test_data, config.runtime.eval_batch_size, experiment.device)
    row = {"global_accuracy": test["accuracy"], "global_loss": test["loss"]}
    if config.federation.local_evaluation:
        local = [m for c in experiment.clients.values() if (m := c.evaluate(server.global_state)) is not None]
        if local:
            total = sum(m["num_examples"] for m in local)
            row["local_accuracy"] = sum(m["accuracy"] * m["num_examples"] for m in local) / total
            row["local_loss"] = sum(m["loss"] * m["num_examples"] for m in local) / total
    return row


def _round_metrics(server: Server, record: RoundRecord) -> dict[str, Any]:
    per_client = server.bytes.per_client(record.round)
    up = [b["up"] for b in per_client.values()]
    down = [b["down"] for b in per_client.values()]
    row: dict[str, Any] = {
        "clients_sampled": len(record.sampled),
        "clients_accepted": len(record.accepted),
        "clients_rejected": len(record.rejected),
        "bytes_up": sum(up),
        "bytes_down": sum(down),
        "bytes_up_per_client": sum(up) / max(len(up), 1),
        "bytes_down_per_client": sum(down) / max(len(down), 1),
    }
    examples = sum(u.num_examples for u in record.accepted)
    losses = [(u.metrics.get("train_loss"), u.num_examples) for u in record.accepted]
    if examples and all(loss is not None for loss, _ in losses):
        row["train_loss"] = sum(loss * n for loss, n in losses) / examples
    return row


def _client_rows(server: Server, record: RoundRecord) -> list[dict[str, Any]]:
    per_client = server.bytes.per_client(record.round)
    updates = {u.client_id: u for u in record.accepted}
    rows = []
    for cid in record.sampled:
        row: dict[str, Any] = {"round": record.round, "client_id": cid, "accepted": cid in updates}
        row.update({f"bytes_{d}": per_client.get(cid, {}).get(d, 0) for d in ("up", "down")})
        if cid in updates:
            row.update({"num_examples": updates[cid].num_examples, **updates[cid].metrics})
        else:
            row["reason"] = record.rejected.get(cid, "")
        rows.append(row)
    return rows


def summarize(result: RunResult) -> dict[str, Any]:
    """First and last global accuracy, bytes per client per round and its share of the backbone."""
    evaluated = [r for r in result.history if "global_accuracy" in r]
    trained = [r for r in result.history if r["round"] > 0]
    summary: dict[str, Any] = {
        "rounds": len(trained),
        "initial_accuracy": evaluated[0]["global_accuracy"] if evaluated else None,
        "final_accuracy": evaluated[-1]["global_accuracy"] if evaluated else None,
        "final_local_accuracy": evaluated[-1].get("local_accuracy") if evaluated else None,
        "backbone_bytes": result.backbone_bytes,
    }
    if trained:
        up = sum(r["bytes_up_per_client"] for r in trained) / len(trained)
        summary["bytes_up_per_client_round"] = up
        summary["bytes_down_per_client_round"] = sum(r["bytes_down_per_client"] for r in trained) / len(
            trained
        )
        summary["bytes_up_over_backbone"] = up / result.backbone_bytes if result.backbone_bytes else None
        summary["total_bytes"] = sum(r["bytes_up"] + r["bytes_down"] for r in trained)
    return summary


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
