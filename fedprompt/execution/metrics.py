"""What a run records: evaluation of the global prompt, per-round and per-client rows, the summary.

Shared by every runtime (in-process, Flower), so their metrics files are the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from fedprompt.config import RunConfig
from fedprompt.execution.results import (
    CLIENTS_FILE,
    CONFIG_HASH_KEY,
    METRICS_FILE,
    RunDirectory,
    RunResult,
    config_fingerprint,
)
from fedprompt.federation.client_state import MemoryClientStates
from fedprompt.federation.privacy.accounting import plan_privacy
from fedprompt.federation.privacy.noise import REPRODUCIBLE, REPRODUCIBLE_WARNING
from fedprompt.federation.server import RoundRecord, Server
from fedprompt.federation.state import State
from fedprompt.tasks.experiment import Experiment
from fedprompt.training.gradient import evaluate


def evaluate_global(experiment: Experiment, global_state: State, config: RunConfig) -> dict[str, float]:
    """Metrics of the global prompt on the server's test set and on its extra evaluation sets."""
    experiment.model.load_state_dict(experiment.full_state(global_state), strict=True)
    test = evaluate(experiment.model, experiment.test_data, config.runtime.eval_batch_size, experiment.device)
    row = {"global_accuracy": test["accuracy"], "global_loss": test["loss"]}
    groups: dict[str, list[float]] = {}
    worst: dict[str, list[float]] = {}
    for name, eval_set in experiment.eval_sets.items():
        with experiment.model.scoring(eval_set.class_names):
            metrics = evaluate(
                experiment.model, eval_set.data, config.runtime.eval_batch_size, experiment.device
            )
        row[f"{name}_accuracy"] = metrics["accuracy"]
        if eval_set.group is not None:
            groups.setdefault(eval_set.group, []).append(metrics["accuracy"])
        if eval_set.worst_group is not None:
            worst.setdefault(eval_set.worst_group, []).append(metrics["accuracy"])
    row.update({f"{group}_accuracy": sum(values) / len(values) for group, values in groups.items()})
    row.update({f"{group}_accuracy": min(values) for group, values in worst.items()})
    if "base_accuracy" in row and "novel_accuracy" in row:  # base-to-novel: HM = 2·B·N / (B + N)
        base, novel = row["base_accuracy"], row["novel_accuracy"]
        row["harmonic_mean"] = 2 * base * novel / (base + novel) if base + novel else 0.0
    return row


def evaluate_client(
    experiment: Experiment, client_id: int, global_state: State, carried: State
) -> dict[str, float] | None:
    """One client's metrics on its held-out split (None without one): the global prompt's accuracy
    and loss, its personal prompt's accuracy when it keeps one (from its ``carried`` state), and
    the fine-tuning baseline's."""
    client = experiment.clients[client_id]
    metrics = client.evaluate(global_state, carried)
    if metrics is not None and experiment.fine_tuning is not None:
        tuned = client.fine_tuned_accuracy(global_state, carried, experiment.fine_tuning)
        if tuned is not None:
            metrics["finetuned_accuracy"] = tuned
    return metrics


def evaluate_round(
    experiment: Experiment, server: Server, config: RunConfig
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The global prompt's metrics and, with ``federation.local_evaluation``, every client's on its
    own split: (the round's row, one row per client)."""
    row = evaluate_global(experiment, server.global_state, config)
    rows: list[dict[str, Any]] = []
    if config.federation.local_evaluation:
        for cid in sorted(experiment.clients):
            carried = experiment.client_states.resolve(cid, server.accepted_round(cid))
            metrics = evaluate_client(experiment, cid, server.global_state, carried)
            if metrics is not None:
                rows.append(client_evaluation_row(server.completed_rounds, cid, metrics))
        row.update(summarize_client_evaluations(rows))
    return row, rows


def client_evaluation_row(round_num: int, client_id: int, metrics: dict[str, float]) -> dict[str, Any]:
    """A client's evaluation as a clients.jsonl row (its metrics renamed to say which prompt)."""
    row: dict[str, Any] = {"round": round_num, "client_id": client_id, "event": "evaluate"}
    row["num_examples"] = int(metrics["num_examples"])
    row["local_accuracy"] = metrics["accuracy"]
    row["local_loss"] = metrics["loss"]
    for key in ("personal_accuracy", "finetuned_accuracy"):
        if key in metrics:
            row[key] = metrics[key]
    return row


def summarize_client_evaluations(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The round's view of its client evaluations: example-weighted ``local_accuracy`` and
    ``local_loss`` of the global prompt, and the mean and worst client of every per-client
    accuracy (``local_accuracy_mean``, ``personal_accuracy_worst``, ...)."""
    if not rows:
        return {}
    total = sum(r["num_examples"] for r in rows)
    out = {
        "local_accuracy": sum(r["local_accuracy"] * r["num_examples"] for r in rows) / total,
        "local_loss": sum(r["local_loss"] * r["num_examples"] for r in rows) / total,
    }
    for key in ("local_accuracy", "personal_accuracy", "finetuned_accuracy"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_worst"] = min(values)
    return out


def round_metrics(server: Server, record: RoundRecord) -> dict[str, Any]:
    """One round's bookkeeping: clients sampled, accepted, rejected and clamped, bytes, weighted
    train loss, why aggregation failed (if it did), and what the aggregation stages report."""
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
    if record.clamped:
        row["clients_clamped"] = len(record.clamped)
    if record.aggregation_error is not None:
        row["aggregation_error"] = record.aggregation_error
    examples = sum(u.num_examples for u in record.accepted)
    losses = [(u.metrics.get("train_loss"), u.num_examples) for u in record.accepted]
    if examples and all(loss is not None for loss, _ in losses):
        row["train_loss"] = sum(loss * n for loss, n in losses) / examples
    row.update(record.stage_metrics)
    return row


def client_rows(server: Server, record: RoundRecord) -> list[dict[str, Any]]:
    """One row per sampled client: accepted or why not, bytes up and down, its local metrics, the
    count it claimed when that was clamped, the norm of its delta when the server measured it."""
    per_client = server.bytes.per_client(record.round)
    updates = {u.client_id: u for u in record.accepted}
    rows = []
    for cid in record.sampled:
        row: dict[str, Any] = {"round": record.round, "client_id": cid, "event": "fit"}
        row["accepted"] = cid in updates
        row.update({f"bytes_{d}": per_client.get(cid, {}).get(d, 0) for d in ("up", "down")})
        if cid in updates:
            metrics = {k: v for k, v in updates[cid].metrics.items() if k not in row}
            row.update({"num_examples": updates[cid].num_examples, **metrics})
            if cid in record.clamped:
                row["num_examples_claimed"] = record.clamped[cid]
            if cid in record.norms:
                row["update_norm"] = record.norms[cid]
        else:
            row["reason"] = record.rejected.get(cid, "")
        rows.append(row)
    return rows


PENDING_ROUND_KEY = "fedprompt.pending_round"
"""Checkpoint metadata of a round released but not yet recorded: its row and client rows (JSON)."""
_MAIN_ACCURACIES = ("global_accuracy", "local_accuracy")
_SUMMARIZED = re.compile(r"^harmonic_mean$|_accuracy$|_accuracy_(mean|worst)$|^epsilon$|^clip_norm$")
_PRIVACY_SETTINGS = ("delta", "noise_multiplier", "sampling_rate")
"""What a differentially private run's summary states beside ``final_epsilon``."""


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
    if evaluated:  # the last values of extra evaluation sets, personal prompts and privacy
        summary.update(
            {
                f"final_{key}": value
                for key, value in evaluated[-1].items()
                if key not in _MAIN_ACCURACIES and _SUMMARIZED.search(key)
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
    plan = plan_privacy(result.config)
    if plan is not None:
        summary.update({"privacy": plan.kind, "sampling": plan.sampling})
        summary["noise_seed"] = result.config.privacy.noise_seed
        if result.config.privacy.noise_seed == REPRODUCIBLE:
            summary["privacy_warning"] = REPRODUCIBLE_WARNING
        summary.update({key: trained[-1][key] for key in _PRIVACY_SETTINGS if trained and key in trained[-1]})
    return summary


class RunRecorder:
    """Owns a run's growing record: the per-round history, the per-client rows and, when the run
    writes one, its results folder (rows appended as they come, a checkpoint after every round,
    the final prompt and summary at the end). Every runtime records through it.

    A round is recorded in two steps, so that nothing the server releases is released twice for
    one round: :meth:`release` checkpoints the round's new global state (and the round's rows so
    far) the moment it is aggregated, before it leaves the server for an evaluation or the next
    round's downlink; :meth:`record_round` adds the evaluation and writes the rows. A run that
    stops in between resumes with that round's aggregate as it was released (``pending``: the
    round whose evaluation and rows are still to be written), never by computing the round again.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: RunDirectory | None,
        client_states: MemoryClientStates | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.client_states = client_states
        """Checkpointed with the server when the clients live in this process."""
        self.history: list[dict[str, Any]] = []
        self.client_history: list[dict[str, Any]] = []
        self.pending: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        """The released round's row and client rows, until its evaluation is recorded."""

    def resume(self, server: Server) -> bool:
        """Restore ``server``, the clients' carried states and the rows from the folder's last
        released round; False without a checkpoint. When that round's rows were not yet written,
        ``pending`` holds them for the runtime to evaluate and record."""
        checkpoint = self.run_dir.load_checkpoint() if self.run_dir else None
        if checkpoint is None or self.run_dir is None:
            return False
        server.restore(*checkpoint)
        if self.client_states is not None:
            self.client_states.restore(*checkpoint)
        pending = checkpoint[1].get(PENDING_ROUND_KEY)
        self.pending = None
        if pending is not None:
            saved = json.loads(pending)
            self.pending = (saved["row"], saved["clients"])
        written = server.completed_rounds - (1 if self.pending else 0)
        for file in (METRICS_FILE, CLIENTS_FILE):
            self.run_dir.truncate_after(file, written)
        self.history = self.run_dir.read(METRICS_FILE)
        self.client_history = self.run_dir.read(CLIENTS_FILE)
        return True

    def record_initial(self, row: dict[str, Any], clients: list[dict[str, Any]] = ()) -> None:
        """Round 0: the initial prompt's metrics (and the clients' evaluations)."""
        self.history.append({"round": 0, **row})
        self.client_history.extend(clients)
        if self.run_dir:
            self.run_dir.append(METRICS_FILE, self.history[-1:])
            self.run_dir.append(CLIENTS_FILE, list(clients))

    def release(self, row: dict[str, Any], clients: list[dict[str, Any]], server: Server) -> None:
        """A round was just aggregated: checkpoint its global state (with its rows so far) before
        anything of it leaves the server."""
        self.pending = (row, clients)
        if self.run_dir:
            pending = json.dumps({"row": row, "clients": clients}, default=float)
            tensors, metadata = self._checkpoint(server)
            self.run_dir.save_checkpoint(tensors, {**metadata, PENDING_ROUND_KEY: pending})

    def record_round(
        self, evaluated: dict[str, Any], evaluations: list[dict[str, Any]], server: Server
    ) -> dict[str, Any]:
        """The released round's evaluation (``evaluated``: metrics for its row; ``evaluations``:
        client rows): write its rows and the checkpoint that marks it complete. Returns the row."""
        if self.pending is None:
            raise RuntimeError("record_round without a released round: call release first")
        row, clients = self.pending
        row, clients = {**row, **evaluated}, [*clients, *evaluations]
        self.pending = None
        self.history.append(row)
        self.client_history.extend(clients)
        if self.run_dir:
            self.run_dir.append(METRICS_FILE, [row])
            self.run_dir.append(CLIENTS_FILE, clients)
            self.run_dir.save_checkpoint(*self._checkpoint(server))
        return row

    def _checkpoint(self, server: Server) -> tuple[State, dict[str, str]]:
        tensors, metadata = server.checkpoint()
        if self.client_states is not None:
            client_tensors, client_metadata = self.client_states.checkpoint()
            tensors, metadata = {**tensors, **client_tensors}, {**metadata, **client_metadata}
        return tensors, {**metadata, CONFIG_HASH_KEY: config_fingerprint(self.config)}

    def finish(
        self,
        server: Server,
        backbone_bytes: int,
        label_names: Sequence[str] = (),
        notes: dict[str, Any] | None = None,
    ) -> RunResult:
        """The run's result, with the final prompt and summary written to the folder (the summary
        names the classes in logit order, which an exported prompt's head needs, and carries the
        experiment's ``notes``)."""
        result = RunResult(
            config=self.config,
            history=self.history,
            client_history=self.client_history,
            final_state=server.global_state,
            run_dir=self.run_dir.path if self.run_dir else None,
            backbone_bytes=backbone_bytes,
        )
        result.summary = summarize(result)
        if label_names:
            result.summary["label_names"] = list(label_names)
        result.summary.update(notes or {})
        if self.run_dir:
            self.run_dir.save_final(server.global_state)
            self.run_dir.write_summary(result.summary)
            if self.config.output.plot:
                from fedprompt.execution.plots import save_run_plot
                from fedprompt.execution.report import RunRecord

                record = RunRecord(self.run_dir.path.name, self.history, result.summary, self.run_dir.path)
                save_run_plot(record, self.run_dir.path)
        return result
