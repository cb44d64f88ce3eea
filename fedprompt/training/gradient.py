"""Local training and evaluation of a prompt module on one party's data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedprompt.config import GradientOptimizerConfig
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.state import State
from fedprompt.seeding import torch_generator
from fedprompt.training.batching import TensorData
from optimizers.base import OptimizationStats
from optimizers.gradient import GradientOptimizer, GradientSettings
from optimizers.schedules import RoundSchedule
from prompt_modules.base import PromptModule

if TYPE_CHECKING:
    from accelerate import Accelerator


def gradient_optimizer(
    config: GradientOptimizerConfig, accelerator: Accelerator | None = None
) -> GradientOptimizer:
    """The gradient optimiser the config's optimizer section describes (devices and precision
    through ``accelerator``)."""
    return GradientOptimizer(
        GradientSettings(
            algorithm=config.algorithm,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            epochs=config.epochs,
            max_steps=config.max_steps,
            grad_clip=config.grad_clip,
            keep_state=config.keep_state,
        ),
        accelerator,
    )


def round_schedule(config: GradientOptimizerConfig, rounds: int) -> RoundSchedule | None:
    """The learning-rate schedule over rounds of the optimizer section (``rounds``: the run's
    federation.rounds, the cosine's span unless the schedule pins its own); None when the
    learning rate never changes."""
    schedule = config.schedule
    if schedule.kind == "constant" and schedule.warmup_rounds == 0:
        return None
    return RoundSchedule(
        kind=schedule.kind,
        horizon=schedule.rounds or rounds,
        gamma=schedule.gamma,
        step_rounds=schedule.step_rounds,
        min_factor=schedule.min_lr / config.lr,
        warmup_rounds=schedule.warmup_rounds,
        warmup=schedule.warmup,
        warmup_factor=schedule.warmup_lr / config.lr,
    )


OPTIMIZER_STATE = "optimizer/"
"""Carried-state prefix of a client's local optimiser state (``optimizer.keep_state``)."""


@dataclass
class LocalRound:
    """What a local round sees beyond its data: the server's instructions (round, seed, extras),
    the state the client carries from earlier rounds (read-only), a term the strategy's client side
    adds to the loss (on the module's named trainable parameters), ``carry_out``, where a
    trainer puts state of its own to carry into the next round (e.g. ATPFL's previous local prompt),
    and the client's unlabelled examples (few-shot clients; their labels are ``UNLABELLED``)."""

    instructions: FitInstructions
    carried: State = field(default_factory=dict)
    penalty: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None
    carry_out: State = field(default_factory=dict)
    unlabelled: TensorData | None = None


class LocalTrainer(ABC):
    """Trains the prompt state of a module in place on one client's data."""

    @abstractmethod
    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        """Update ``model``'s prompt state; return what the optimisation did."""


class GradientTrainer(LocalTrainer):
    """Owns the gradient local objective: cross-entropy on shuffled local batches, plus the term the
    strategy's client side adds (``context.penalty``: FedProx's proximal term, SCAFFOLD's
    correction, ...), minimised by a ``GradientOptimizer``.

    A module with a ``param_groups()`` method (e.g. twin prompts, one group per part with its own
    learning rate) is optimised in those groups; subclasses change the loss through ``objective``.
    With a ``schedule``, round r's steps run at ``schedule.factor(r)`` times every group's rate.
    When the optimiser keeps its state (``keep_state``), a round resumes it from the client's
    carried state (``optimizer/<index>/<name>``) and hands its end state to the next round there.
    """

    def __init__(
        self,
        optimizer: GradientOptimizer,
        batch_size: int,
        device: torch.device | str,
        schedule: RoundSchedule | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.device = device
        self.schedule = schedule

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        penalty = local.penalty

        def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            loss = self.objective(model, batch)
            if penalty is not None:
                loss = loss + penalty(params)
            return loss, len(batch["labels"])

        generator = torch_generator(local.instructions.seed)
        param_groups = getattr(model, "param_groups", None)
        factor = 1.0 if self.schedule is None else self.schedule.factor(local.instructions.round)
        keep = self.optimizer.settings.keep_state
        resume = {
            k.removeprefix(OPTIMIZER_STATE): v
            for k, v in local.carried.items()
            if k.startswith(OPTIMIZER_STATE)
        }
        model.train()
        try:
            stats = self.optimizer.run(
                param_groups() if callable(param_groups) else list(params.values()),
                loss_fn,
                lambda epoch: data.batches(self.batch_size, generator=generator, device=self.device),
                lr_factor=None if self.schedule is None else lambda step: factor,
                resume=resume if keep else None,
            )
        finally:
            model.eval()
        if keep:
            local.carry_out.update({OPTIMIZER_STATE + k: v for k, v in stats.optimizer_state.items()})
        return stats

    def objective(self, model: PromptModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one batch before FedProx's term: cross-entropy of the module's logits."""
        return F.cross_entropy(model(batch).float(), batch["labels"])


@torch.inference_mode()
def evaluate(
    model: PromptModule, data: TensorData, batch_size: int, device: torch.device | str
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.eval()
    correct, loss_sum = 0, 0.0
    for batch in data.batches(batch_size, device=device):
        logits = model(batch).float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(1) == batch["labels"]).sum())
    return {"accuracy": correct / len(data), "loss": loss_sum / len(data), "num_examples": float(len(data))}
