"""Scores of a finished VQA run on each client's test questions: which questions each client's
prompt answers right, and the majority-answer baselines, summed into table rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedprompt.execution.results import RunResult
from fedprompt.federation.state import State
from fedprompt.tasks.experiment import Experiment

ALL, MEAN = "all clients", "mean over clients"


@dataclass(frozen=True)
class ClientQuestions:
    """One client's test questions: labels, closed flags and question-type indices (-1: none)."""

    rows: np.ndarray
    labels: np.ndarray
    closed: np.ndarray
    types: np.ndarray


@dataclass(frozen=True)
class Scored:
    """Which of each client's test questions a method (or baseline) answers right."""

    correct: dict[str, np.ndarray]


def client_questions(experiment: Experiment) -> dict[str, ClientQuestions]:
    """Each client's test questions (those whose client field names it), by client name."""
    names = experiment.notes["clients"]
    tensors = experiment.test_data.tensors
    client = tensors["client"].numpy()
    out = {}
    for cid, name in sorted(names.items(), key=lambda item: int(item[0])):
        rows = np.flatnonzero(client == int(cid))
        out[name] = ClientQuestions(
            rows,
            tensors["labels"].numpy()[rows],
            tensors["closed"].numpy()[rows],
            tensors["question_type"].numpy()[rows],
        )
    return out


@torch.no_grad()
def _answered_right(experiment: Experiment, state: State, rows: np.ndarray, batch_size: int) -> np.ndarray:
    model = experiment.model
    model.load_state_dict(state, strict=True)
    model.eval()
    data = experiment.test_data.subset(rows)
    right = [
        (model(batch).argmax(1) == batch["labels"]).cpu().numpy()
        for batch in data.batches(batch_size, device=experiment.device)
    ]
    return np.concatenate(right) if right else np.zeros(0, dtype=bool)


def score_run(experiment: Experiment, result: RunResult, personal: bool, batch_size: int) -> Scored:
    """Each client's test questions answered by its final personal prompt (``personal``) or by the
    final global prompt."""
    questions = client_questions(experiment)
    ids = {name: int(cid) for cid, name in experiment.notes["clients"].items()}
    global_state = experiment.full_state(result.final_state)
    correct = {}
    for name, qs in questions.items():
        state = global_state
        if personal:
            client = experiment.clients[ids[name]]
            _, carried = experiment.client_states.committed(ids[name])
            state = client.personal_state(result.final_state, carried) or global_state
        correct[name] = _answered_right(experiment, state, qs.rows, batch_size)
    return Scored(correct)


def _kinds(closed: np.ndarray, types: np.ndarray) -> list[tuple[str, int]]:
    """A question's kind for the majority answer: its type, else closed or open."""
    return [("type", int(t)) if t >= 0 else ("closed", int(c)) for c, t in zip(closed, types, strict=True)]


def _majority(labels: np.ndarray, kinds: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], Counter] = {}
    for label, kind in zip(labels.tolist(), kinds, strict=True):
        counts.setdefault(kind, Counter())[label] += 1
    return {kind: count.most_common(1)[0][0] for kind, count in counts.items()}


def majority_scores(experiment: Experiment) -> dict[str, Scored]:
    """The majority-answer baselines: each test question gets the most common training answer of its
    kind (question type, else closed/open) among the pooled training questions of all clients
    (``majority (pooled)``), or among its own client's (``majority (own client)``)."""
    ids = {name: int(cid) for cid, name in experiment.notes["clients"].items()}
    train: dict[str, tuple[np.ndarray, list]] = {}
    for name, cid in ids.items():
        client = experiment.clients[cid]
        parts = [client.train_data] + ([client.val_data] if client.val_data is not None else [])
        labels = np.concatenate([p.tensors["labels"].numpy() for p in parts])
        closed = np.concatenate([p.tensors["closed"].numpy() for p in parts])
        types = np.concatenate([p.tensors["question_type"].numpy() for p in parts])
        train[name] = (labels, _kinds(closed, types))
    pooled = _majority(
        np.concatenate([labels for labels, _ in train.values()]),
        [k for _, kinds in train.values() for k in kinds],
    )
    out: dict[str, dict[str, np.ndarray]] = {"majority (pooled)": {}, "majority (own client)": {}}
    for name, qs in client_questions(experiment).items():
        kinds = _kinds(qs.closed, qs.types)
        own = _majority(*train[name])
        for label, table in (("majority (pooled)", pooled), ("majority (own client)", own)):
            guess = np.array([table.get(kind, -1) for kind in kinds], dtype=np.int64)
            out[label][name] = guess == qs.labels
    return {label: Scored(correct) for label, correct in out.items()}


def table_rows(
    scores: Mapping[str, Scored], questions: Mapping[str, ClientQuestions], type_names: Sequence[str]
) -> list[dict[str, object]]:
    """One row per (method, client), then per method the pooled (``all clients``, each question
    answered by its own client's prompt) and the unweighted mean over clients: questions, accuracy,
    closed and open accuracy, accuracy per question type (None where a client has no such question)."""
    rows: list[dict[str, object]] = []
    for method, scored in scores.items():
        per_client = []
        for name, qs in questions.items():
            row = {
                "method": method,
                "client": name,
                **_accuracies(scored.correct[name], qs.closed, qs.types, type_names),
            }
            per_client.append(row)
        every = np.concatenate([scored.correct[n] for n in questions])
        closed = np.concatenate([q.closed for q in questions.values()])
        types = np.concatenate([q.types for q in questions.values()])
        rows += per_client
        rows.append({"method": method, "client": ALL, **_accuracies(every, closed, types, type_names)})
        mean: dict[str, object] = {"method": method, "client": MEAN, "questions": None}
        for key in per_client[0]:
            if key in ("method", "client", "questions"):
                continue
            values = [r[key] for r in per_client if r[key] is not None]
            mean[key] = float(np.mean(values)) if values else None
        rows.append(mean)
    return rows


def _accuracies(
    correct: np.ndarray, closed: np.ndarray, types: np.ndarray, type_names: Sequence[str]
) -> dict[str, object]:
    def share(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    row: dict[str, object] = {
        "questions": len(correct),
        "accuracy": float(correct.mean()) if len(correct) else None,
        "closed": share(closed.astype(bool)),
        "open": share(~closed.astype(bool)),
    }
    for index, name in enumerate(type_names):
        row[f"type: {name}"] = share(types == index)
    return row
