"""What a run records: evaluation of the global prompt, per-round and per-client rows, the summary.

Shared by every runtime (in-process, Flower), so their metrics files are the same.
"""

from __future__ import annotations

from typing import Any

from fedprompt.config import RunConfig
from fedprompt.experiment import Experiment
from fedprompt.results import CLIENTS_FILE, METRICS_FILE, RunDirectory, RunResult
from fedprompt.server import RoundRecord, Server
from fedprompt.training import evaluate


def evaluate_round(experiment: Experiment, server: Server, config: RunConfig) -> dict[str, float]:
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
    for name, eval_set in experiment.eval_sets.items():
        with experiment.model.scoring(eval_set.class_names):
            metrics = evaluate(
                experiment.model, eval_set.data, config.runtime.eval_batch_size, experiment.device
            )
        row[f"{name}_accuracy"] = metrics["accuracy"]
    if "base_accuracy" in row and "novel_accuracy" in row:  # base-to-novel: HM = 2·B·N / (B + N)
        base, novel = row["base_accuracy"], row["novel_accuracy"]
        row["harmonic_mean"] = 2 * base * novel / (base + novel) if base + novel else 0.0
    return row


def round_metrics(server: Server, record: RoundRecord) -> dict[str, Any]:
    """One round's bookkeeping: clients sampled, accepted and rejected, bytes, weighted train loss."""
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


def client_rows(server: Server, record: RoundRecord) -> list[dict[str, Any]]:
    """One row per sampled client: accepted or why not, bytes up and down, its local metrics."""
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


_MAIN_ACCURACIES = ("global_accuracy", "local_accuracy")


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
    if evaluated:  # the last values of extra evaluation sets (base/novel accuracy, harmonic mean)
        summary.update(
            {
                f"final_{key}": value
                for key, value in evaluated[-1].items()
                if key == "harmonic_mean" or (key.endswith("_accuracy") and key not in _MAIN_ACCURACIES)
            }
        )
    if trained:
        up = sum(r["bytes_up_per_client"] for r in trained) / len(trained)
        summary["bytes_up_per_client_round"] = up
        summary["bytes_down_per_client_round"] = sum(r["bytes_down_per_client"] for r in trained) / len(
            trained
        )
        summary["bytes_up_over_backbone"] = up / result.backbone_bytes if result.backbone_bytes else None
        summary["total_bytes"] = sum(r["bytes_up"] + r["bytes_down"] for r in trained)
    return summary


class RunRecorder:
    """Owns a run's growing record: the per-round history, the per-client rows and, when the run
    writes one, its results folder (rows appended as they come, a checkpoint after every round,
    the final prompt and summary at the end). Every runtime records through it."""

    def __init__(self, config: RunConfig, run_dir: RunDirectory | None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.history: list[dict[str, Any]] = []
        self.client_history: list[dict[str, Any]] = []

    def resume(self, server: Server) -> bool:
        """Restore ``server`` and the rows from the folder's last complete round; False without one."""
        checkpoint = self.run_dir.load_checkpoint() if self.run_dir else None
        if checkpoint is None or self.run_dir is None:
            return False
        server.restore(*checkpoint)
        for file in (METRICS_FILE, CLIENTS_FILE):
            self.run_dir.truncate_after(file, server.completed_rounds)
        self.history = self.run_dir.read(METRICS_FILE)
        self.client_history = self.run_dir.read(CLIENTS_FILE)
        return True

    def record_initial(self, row: dict[str, Any]) -> None:
        """Round 0: the initial prompt's metrics."""
        self.history.append({"round": 0, **row})
        if self.run_dir:
            self.run_dir.append(METRICS_FILE, self.history[-1:])

    def record_round(self, row: dict[str, Any], clients: list[dict[str, Any]], server: Server) -> None:
        """One completed round: its row, its client rows, and the checkpoint that makes it resumable."""
        self.history.append(row)
        self.client_history.extend(clients)
        if self.run_dir:
            self.run_dir.append(METRICS_FILE, [row])
            self.run_dir.append(CLIENTS_FILE, clients)
            self.run_dir.save_checkpoint(*server.checkpoint())

    def finish(self, server: Server, backbone_bytes: int, notes: dict[str, Any] | None = None) -> RunResult:
        """The run's result, with the final prompt and summary (plus the experiment's ``notes``)
        written to the folder."""
        result = RunResult(
            config=self.config,
            history=self.history,
            client_history=self.client_history,
            final_state=server.global_state,
            run_dir=self.run_dir.path if self.run_dir else None,
            backbone_bytes=backbone_bytes,
        )
        result.summary = {**summarize(result), **(notes or {})}
        if self.run_dir:
            self.run_dir.save_final(server.global_state)
            self.run_dir.write_summary(result.summary)
        return result
