"""Everything one process needs for a run, built once from the configuration: the ``Experiment``
a runtime drives and the held-out sets it reports on. ``tasks.registry`` builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedprompt.federation.client_state import ClientStateStore, MemoryClientStates
from fedprompt.federation.personalization import PromptSplit
from fedprompt.federation.state import State
from fedprompt.federation.strategies.base import Strategy
from fedprompt.training.batching import TensorData
from fedprompt.training.client import Client, FineTuning
from prompt_modules.base import PromptModule


@dataclass
class EvalSet:
    """A held-out set the server reports on beside the test set (e.g. base and novel classes):
    its examples and the class names its labels index, which the model scores against.
    Sets of one ``group`` (e.g. each pooled dataset's base classes) are also reported as
    ``<group>_accuracy``, the unweighted mean of their accuracies (FedTPG's average over datasets)."""

    data: TensorData
    class_names: list[str]
    group: str | None = None
    worst_group: str | None = None
    """Sets of one ``worst_group`` are also reported as ``<worst_group>_accuracy``, the lowest of
    their accuracies (e.g. the worst domain)."""


@dataclass
class Experiment:
    """Owns what a runtime drives: the shared prompt module on its frozen backbone (one per process),
    the clients and their carried states, the server's held-out test data (and the set it accepts
    new global prompts on), the strategy, the split of the prompt into its aggregated and local
    parts, and the device."""

    model: PromptModule
    clients: dict[int, Client]
    test_data: TensorData
    strategy: Strategy
    device: torch.device
    backbone_bytes: int
    label_names: list[str]
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)
    """Reported as ``<name>_accuracy`` each evaluation; the model must have ``scoring(class_names)``."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Facts the run summary carries (plain JSON): e.g. that the backbone is a demo one and what it
    was trained on, baselines to compare with, rows the data left out."""
    split: PromptSplit | None = None
    client_states: ClientStateStore = field(default_factory=MemoryClientStates)
    fine_tuning: FineTuning | None = None
    """The fine-tune-after-federation baseline evaluated with each client (personalization.finetune_steps)."""
    acceptance_data: TensorData | None = None
    """The held-out set the server scores each candidate global prompt on (``federation.acceptance``),
    kept back from the training pool before partitioning: no client holds it."""
    client_domains: dict[int, int] | None = None
    """Each client's domain, as the partition made it (``partition.kind: domains``; every client of
    the run, hosted here or not), for strategies that keep a prompt per domain."""

    def __post_init__(self) -> None:
        if self.split is None:
            self.split = PromptSplit(self.model.prompt_state())

    def initial_state(self) -> State:
        """The prompt state the server starts from: the aggregated part of the module's initial prompt."""
        return self.split.wire(self.model.prompt_state())

    def full_state(self, wire: State) -> State:
        """The module's full prompt state for a wire state (a split prompt's initial local part added)."""
        return self.split.join(wire, {})

    def example_counts(self) -> dict[int, int]:
        """The training-set size of each client built here (what bounds its aggregation weight)."""
        return {cid: len(client.train_data) for cid, client in self.clients.items()}
