"""Which builder makes the experiment of a configuration (a table of task kinds, each builder
imported on use so a text run never imports open_clip), and what every task's clients get
beside their data: the client side of the strategy, local DP, the prompt split, fine-tuning."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib import import_module

from fedprompt.config import LLM_BACKBONE_KINDS, ConfigError, GradientOptimizerConfig, RunConfig
from fedprompt.federation.personalization import prompt_split
from fedprompt.federation.privacy.accounting import plan_privacy
from fedprompt.federation.privacy.stages import privacy_client_rule
from fedprompt.federation.strategies.fedkseed import kseed_setup
from fedprompt.federation.strategies.registry import build_client_rule
from fedprompt.seeding import derive_seed
from fedprompt.tasks.experiment import Experiment
from fedprompt.tasks.preflight import check_model_fields
from fedprompt.training.client import FineTuning
from fedprompt.training.device import make_accelerator
from fedprompt.training.gradient import GradientTrainer, gradient_optimizer

log = logging.getLogger("fedprompt.tasks")


@dataclass(frozen=True)
class TaskBuilder:
    """A task kind: which configurations it builds, and the ``module:function`` that builds them."""

    name: str
    accepts: Callable[[RunConfig], bool]
    builder: str

    def build(self, config: RunConfig, client_ids: Collection[int] | None) -> Experiment:
        module, _, function = self.builder.partition(":")
        return getattr(import_module(module), function)(config, client_ids)


TASKS = (
    TaskBuilder(
        "text classification",
        lambda c: c.backbone.kind in ("hf-text", "remote", *LLM_BACKBONE_KINDS),
        "fedprompt.tasks.text.classification:build_text_experiment",
    ),
    TaskBuilder(
        "visual question answering",
        lambda c: c.backbone.kind == "open-clip" and c.data.source == "vqa",
        "fedprompt.tasks.clip.vqa:build_vqa_experiment",
    ),
    TaskBuilder(
        "image classification",
        lambda c: c.backbone.kind == "open-clip",
        "fedprompt.tasks.clip.classification:build_vision_experiment",
    ),
)
"""The task kinds, the first that accepts a configuration builds it."""


def build_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Build the experiment for the configured backbone kind.

    ``client_ids`` limits the clients built to those ids (a process that hosts some clients
    only, e.g. one Flower SuperNode); the partition is the same whichever ids are built.
    The layer-dependent fields are checked from the model's configuration before anything loads.
    """
    check_model_fields(config)
    plan_privacy(config)  # a noise too small for the asked ε is refused before anything loads
    task = next((task for task in TASKS if task.accepts(config)), None)
    if task is None:
        raise NotImplementedError(f"backbone kind {config.backbone.kind!r} has no experiment builder")
    return attach_client_side(task.build(config, client_ids), config)


def attach_client_side(experiment: Experiment, config: RunConfig) -> Experiment:
    """Give the experiment and its clients the client side of the strategy (with local differential
    privacy's noise around it), the prompt split of ``personalization`` and the fine-tuning
    baseline (the same for every task kind); say at start, and note in the run summary, where the
    configuration departs from the strategy's paper."""
    try:
        split = prompt_split(config.personalization, experiment.model.prompt_state())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    experiment.split = split
    departures = config.paper_departures()
    for departure in departures:
        log.warning("%s", departure)
    if departures:
        experiment.notes["paper_departures"] = departures
    rule = privacy_client_rule(
        build_client_rule(
            config.strategy,
            kseed_setup(config),
            experiment.initial_state(),
            experiment.client_domains,
            experiment.model.prompt_tensor_names(),
        ),
        config,
    )
    for client in experiment.clients.values():
        client.rule, client.split = rule, split
    steps = config.personalization.finetune_steps
    if steps is not None and isinstance(config.optimizer, GradientOptimizerConfig):
        # every epoch has at least one batch, so `steps` epochs always reach `steps` steps
        settings = config.optimizer.model_copy(
            update={"max_steps": steps, "epochs": steps, "keep_state": False}
        )
        optimizer = gradient_optimizer(settings, make_accelerator(config.runtime))
        trainer = GradientTrainer(optimizer, settings.batch_size, experiment.device)
        experiment.fine_tuning = FineTuning(steps, trainer, derive_seed(config.seed, "fine-tuning"))
    return experiment
