"""Black-box local training of an intrinsic prompt's z: CMA-ES and SPSA through one population call.

The trainers see a ``PopulationModule`` (local backbone or remote service alike) and a client's
data; every model query goes through ``population_losses(Z [P, d], batch) -> [P]``, so the same
trainer runs against a backbone in this process or one behind HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fedprompt.batching import TensorData
from fedprompt.config import (
    CMAESOptimizerConfig,
    FedBPTConfig,
    IntrinsicPromptConfig,
    OptimizerConfig,
    SPSAOptimizerConfig,
    StrategyConfig,
)
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.strategies.fedbpt import FINAL_SIGMA, LOSS, PARENTS, SIGMA, SIGMA_SQ_SUM
from fedprompt.training import FitInstructions, LocalContext, LocalTrainer
from optimizers.base import OptimizationStats
from optimizers.cmaes import CMAESOptimizer, CMAESSettings
from optimizers.zeroth_order import SPSAOptimizer, SPSASettings
from prompt_modules.base import PopulationModule, PromptModule
from prompt_modules.intrinsic import ProjectionSpec

log = logging.getLogger("fedprompt.blackbox")


def search_sigma(optimizer: OptimizerConfig) -> float:
    """σ in BBT's projection scale and FedBPT's first downlink: the CMA-ES initial step, else 1."""
    return optimizer.sigma if isinstance(optimizer, CMAESOptimizerConfig) else 1.0


def projection_spec(prompt: IntrinsicPromptConfig, run_seed: int, sigma: float) -> ProjectionSpec:
    """The projection every party of a run derives from the shared configuration: its seed from
    the run seed and ``projection_seed_offset``, its scale BBT's α/σ."""
    return ProjectionSpec(
        seed=derive_seed(run_seed, "intrinsic-projection", prompt.projection_seed_offset),
        dim=prompt.dim,
        num_tokens=prompt.num_tokens,
        scale=prompt.alpha / sigma,
        p0=prompt.p0,
    )


class _BlackBoxTrainer(LocalTrainer):
    """What both black-box trainers share: the one-vector prompt state and random local batches."""

    def __init__(self, batch_size: int, device: torch.device | str) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device

    @staticmethod
    def _vector(model: PromptModule) -> tuple[PopulationModule, str, torch.Tensor]:
        if not isinstance(model, PopulationModule):
            raise TypeError(
                f"black-box training needs a module that scores candidate vectors (an intrinsic prompt); "
                f"got {type(model).__name__}"
            )
        state = model.prompt_state()
        if len(state) != 1 or next(iter(state.values())).dim() != 1:
            raise TypeError(f"black-box training searches one vector; the prompt state is {list(state)}")
        name, z = next(iter(state.items()))
        return model, name, z.detach().to("cpu", torch.float32)

    def _fresh_batch_loss(
        self, module: PopulationModule, data: TensorData, seed: int
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        """(the population loss on a fresh draw of local examples per call, the examples per draw).

        Each call scores all candidates on the same ``batch_size`` distinct random examples (seeded
        by the round's seed), trimmed to their width.
        """
        generator = torch_generator(seed)
        size = min(self.batch_size, len(data))

        def loss(candidates: torch.Tensor) -> torch.Tensor:
            index = torch.randperm(len(data), generator=generator)[:size]
            return module.population_losses(
                candidates, next(data.subset(index.numpy()).batches(size, device=self.device))
            )

        return loss, size


class CMAESTrainer(_BlackBoxTrainer):
    """Owns a client's local CMA-ES round: warm-started at the global z, with the σ the strategy
    sent down (``instructions.extras['sigma']``, FedBPT) or the optimiser's own.

    Each generation scores the whole population on one fresh random batch of ``batch_size`` local
    examples (all candidates on the same examples, so their ranking is fair). With
    ``report_search_state`` (FedBPT) the client then scores its final mean on all of its training
    data (counted as queries) and returns FedBPT's uplink scalars through ``OptimizationStats.tensors``:
    that loss, Σ_t σ_t², the number of parents μ and the final σ.
    """

    def __init__(
        self,
        optimizer: CMAESOptimizer,
        batch_size: int,
        device: torch.device | str,
        report_search_state: bool = False,
    ) -> None:
        super().__init__(batch_size, device)
        self.optimizer = optimizer
        self.report_search_state = report_search_state

    def train(
        self,
        model: PromptModule,
        data: TensorData,
        instructions: FitInstructions,
        context: LocalContext | None = None,
    ) -> OptimizationStats:
        _no_penalty(context)
        module, name, z0 = self._vector(model)
        sigma = float(instructions.extras[SIGMA].reshape(-1)[0]) if SIGMA in instructions.extras else None
        if self.report_search_state and sigma is None:
            raise ValueError("this client reports a FedBPT search state but the server sent no 'sigma'")
        loss, size = self._fresh_batch_loss(module, data, instructions.seed)
        result = self.optimizer.run(
            z0, loss, examples_per_candidate=size, seed=instructions.seed, sigma=sigma
        )
        if result.stopped:
            log.info("local CMA-ES stopped after %d generations: %s", result.stats.steps, result.stopped)
        model.load_state_dict({name: result.mean}, strict=True)
        stats = result.stats
        stats.extra.update({"sigma": result.sigma, "generations": float(stats.steps)})
        if self.report_search_state:
            stats.final_loss = self._loss_on(module, result.mean, data)
            stats.queries += len(data)
            values = {
                LOSS: stats.final_loss,
                SIGMA_SQ_SUM: float((result.sigmas**2).sum()),
                PARENTS: float(result.parents),
                FINAL_SIGMA: result.sigma,
            }
            stats.tensors = {key: torch.tensor([value], dtype=torch.float32) for key, value in values.items()}
        return stats

    def _loss_on(self, module: PopulationModule, z: torch.Tensor, data: TensorData) -> float:
        """Mean cross-entropy of one vector on every example of ``data``."""
        total = 0.0
        for batch in data.batches(self.batch_size, device=self.device):
            total += float(module.population_losses(z[None], batch)[0]) * len(batch["labels"])
        return total / len(data)


class SPSATrainer(_BlackBoxTrainer):
    """Owns a client's local SPSA round from the global z: each step scores z ± εu (u seeded by
    the round's seed and the step) on one fresh random batch of ``batch_size`` local examples."""

    def __init__(self, optimizer: SPSAOptimizer, batch_size: int, device: torch.device | str) -> None:
        super().__init__(batch_size, device)
        self.optimizer = optimizer

    def train(
        self,
        model: PromptModule,
        data: TensorData,
        instructions: FitInstructions,
        context: LocalContext | None = None,
    ) -> OptimizationStats:
        _no_penalty(context)
        module, name, z0 = self._vector(model)
        loss, size = self._fresh_batch_loss(module, data, instructions.seed)
        result = self.optimizer.run(z0, loss, examples_per_candidate=size, seed=instructions.seed)
        model.load_state_dict({name: result.params}, strict=True)
        result.stats.extra["mean_abs_projected_grad"] = float(result.projected_grads.abs().mean())
        return result.stats


def _no_penalty(context: LocalContext | None) -> None:
    if context is not None and context.penalty is not None:
        raise ValueError("black-box optimisers cannot add a gradient term to the local loss")


def build_blackbox_trainer(
    optimizer: CMAESOptimizerConfig | SPSAOptimizerConfig,
    strategy: StrategyConfig,
    device: torch.device | str,
) -> LocalTrainer:
    """The black-box trainer an optimizer configuration describes (FedBPT's clients report their search)."""
    if isinstance(optimizer, CMAESOptimizerConfig):
        settings = CMAESSettings(popsize=optimizer.popsize, sigma=optimizer.sigma, budget=optimizer.budget)
        return CMAESTrainer(
            CMAESOptimizer(settings),
            optimizer.batch_size,
            device,
            report_search_state=isinstance(strategy, FedBPTConfig),
        )
    settings = SPSASettings(lr=optimizer.lr, epsilon=optimizer.epsilon, budget=optimizer.budget)
    return SPSATrainer(SPSAOptimizer(settings), optimizer.batch_size, device)
