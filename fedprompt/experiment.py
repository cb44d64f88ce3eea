"""Everything one process needs for a run, built once from the configuration."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from fedprompt.batching import TensorData
from fedprompt.client import Client, FineTuning
from fedprompt.client_state import ClientStateStore, MemoryClientStates
from fedprompt.config import GradientOptimizerConfig, RunConfig
from fedprompt.personalization import PromptSplit, prompt_split
from fedprompt.seeding import derive_seed
from fedprompt.state import State
from fedprompt.strategies.base import Strategy
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


@dataclass
class Experiment:
    """Owns what a runtime drives: the shared prompt module on its frozen backbone (one per process),
    the clients and their carried states, the server's held-out test data, the strategy, the
    split of the prompt into its aggregated and local parts, and the device."""

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


def build_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Build the experiment for the configured backbone kind.

    ``client_ids`` limits the clients built to those ids (a process that hosts some clients
    only, e.g. one Flower SuperNode); the partition is the same whichever ids are built.
    The layer-dependent fields are checked from the model's configuration before anything loads.
    """
    from fedprompt.preflight import check_model_fields
    from fedprompt.privacy import plan_privacy

    check_model_fields(config)
    plan_privacy(config)  # a noise too small for the asked ε is refused before anything loads
    if config.backbone.kind in ("hf-text", "remote"):
        from fedprompt.text_task import build_text_experiment

        experiment = build_text_experiment(config, client_ids)
    elif config.backbone.kind == "open-clip" and config.data.source == "vqa":
        from fedprompt.vqa_task import build_vqa_experiment

        experiment = build_vqa_experiment(config, client_ids)
    elif config.backbone.kind == "open-clip":
        from fedprompt.vision_task import build_vision_experiment

        experiment = build_vision_experiment(config, client_ids)
    else:
        raise NotImplementedError(f"backbone kind {config.backbone.kind!r} has no experiment builder")
    return attach_client_side(experiment, config)


def attach_client_side(experiment: Experiment, config: RunConfig) -> Experiment:
    """Give the experiment and its clients the client side of the strategy (with local differential
    privacy's noise around it), the prompt split of ``personalization`` and the fine-tuning
    baseline (the same for every task kind)."""
    from fedprompt.config import ConfigError
    from fedprompt.privacy import privacy_client_rule
    from fedprompt.strategies import build_client_rule
    from fedprompt.strategies.fedkseed import kseed_setup

    try:
        split = prompt_split(config.personalization, experiment.model.prompt_state())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    experiment.split = split
    rule = privacy_client_rule(
        build_client_rule(config.strategy, kseed_setup(config), experiment.initial_state()), config
    )
    for client in experiment.clients.values():
        client.rule, client.split = rule, split
    steps = config.personalization.finetune_steps
    if steps is not None and isinstance(config.optimizer, GradientOptimizerConfig):
        from fedprompt.device import make_accelerator
        from fedprompt.training import GradientTrainer, gradient_optimizer

        # every epoch has at least one batch, so `steps` epochs always reach `steps` steps
        settings = config.optimizer.model_copy(update={"max_steps": steps, "epochs": steps})
        optimizer = gradient_optimizer(settings, make_accelerator(config.runtime))
        trainer = GradientTrainer(optimizer, settings.batch_size, experiment.device)
        experiment.fine_tuning = FineTuning(steps, trainer, derive_seed(config.seed, "fine-tuning"))
    return experiment
