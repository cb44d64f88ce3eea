"""Black-box local training: CMA-ES and SPSA over an intrinsic prompt's z through one population
call, and SPSA (MeZO) over any prompt module's parameters, perturbed in place.

The vector trainers see a ``PopulationModule`` (local backbone or remote service alike) and a
client's data; every model query goes through ``population_losses(Z [P, d], batch) -> [P]``, so
the same trainer runs against a backbone in this process or one behind HTTP. SPSA on any other
prompt module (a soft prompt, a deep prompt) scores the module itself, twice per step, under
``torch.inference_mode``.

Each generation or step scores its candidates either on a fresh random batch of ``batch_size``
local examples (``score_on: batch``) or on the whole local training set (``score_on: local-set``,
as Black-Box Tuning and FedBPT do; then ``batch_size`` only splits the set into forward passes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from fedprompt.config import (
    CMAESOptimizerConfig,
    FedBPTConfig,
    IntrinsicPromptConfig,
    OptimizerConfig,
    SPSAOptimizerConfig,
    StrategyConfig,
)
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.strategies.fedbpt import FINAL_SIGMA, LOSS, PARENTS, SIGMA, SIGMA_SQ_SUM
from fedprompt.federation.strategies.fedkseed import (
    PROJECTED_GRAD,
    SEED_INDEX,
    SEED_PROBABILITIES,
    KSeedSetup,
)
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import LocalRound, LocalTrainer
from optimizers.base import OptimizationStats, checked_losses
from optimizers.cmaes import CMAESOptimizer, CMAESSettings
from optimizers.seed_pool import step_along_, step_coefficient
from optimizers.zeroth_order import InPlaceSPSA, SPSAOptimizer, SPSASettings
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


ScoreOn = Literal["batch", "local-set"]


class _BlackBoxTrainer(LocalTrainer):
    """What both black-box trainers share: the one-vector prompt state and the examples each
    generation or step is scored on (a fresh random batch, or the whole local set)."""

    def __init__(self, batch_size: int, device: torch.device | str, score_on: ScoreOn = "batch") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if score_on not in ("batch", "local-set"):
            raise ValueError(f"score_on must be 'batch' or 'local-set', got {score_on!r}")
        self.batch_size = batch_size
        self.device = device
        self.score_on = score_on

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

    def _population_loss(
        self, module: PopulationModule, data: TensorData, seed: int
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        """(the population loss each generation or step calls, the examples each candidate is scored on)."""
        if self.score_on == "batch":
            return self._fresh_batch_loss(module, data, seed)

        def loss(candidates: torch.Tensor) -> torch.Tensor:
            total = torch.zeros(candidates.shape[0], dtype=torch.float64)
            for batch in data.batches(self.batch_size, device=self.device):
                rows = len(batch["labels"])
                total += module.population_losses(candidates, batch).detach().cpu().double() * rows
            return total / len(data)

        return loss, len(data)


class CMAESTrainer(_BlackBoxTrainer):
    """Owns a client's local CMA-ES round: warm-started at the global z, with the σ the strategy
    sent down (``instructions.extras['sigma']``, FedBPT) or the optimiser's own.

    Each generation scores the whole population on the same examples (so their ranking is fair):
    one fresh random batch of ``batch_size`` local examples, or the whole local set. With
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
        score_on: ScoreOn = "batch",
    ) -> None:
        super().__init__(batch_size, device, score_on)
        self.optimizer = optimizer
        self.report_search_state = report_search_state

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        _no_penalty(local)
        module, name, z0 = self._vector(model)
        extras = local.instructions.extras
        sigma = float(extras[SIGMA].reshape(-1)[0]) if SIGMA in extras else None
        if self.report_search_state and sigma is None:
            raise ValueError("this client reports a FedBPT search state but the server sent no 'sigma'")
        loss, size = self._population_loss(module, data, local.instructions.seed)
        result = self.optimizer.run(
            z0, loss, examples_per_candidate=size, seed=local.instructions.seed, sigma=sigma
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
    """Owns a client's local SPSA round from the global prompt: each step scores θ ± εu (u seeded by
    the round's seed and the step) on the same examples (a fresh random batch of ``batch_size``, or
    the whole local set).

    An intrinsic prompt (one vector scored through ``population_losses``) runs ``SPSAOptimizer``;
    any other prompt module (a soft or deep prompt: MeZO's case) has all its trainable tensors
    perturbed in place by ``InPlaceSPSA``, scored by the module's own forward pass under
    ``torch.inference_mode``: no gradient graph, no copy of the prompt.
    """

    def __init__(
        self,
        optimizer: SPSAOptimizer,
        batch_size: int,
        device: torch.device | str,
        score_on: ScoreOn = "batch",
    ) -> None:
        super().__init__(batch_size, device, score_on)
        self.optimizer = optimizer

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        _no_penalty(local)
        if not _is_one_vector(model):
            return self._train_in_place(model, data, local.instructions)
        module, name, z0 = self._vector(model)
        loss, size = self._population_loss(module, data, local.instructions.seed)
        result = self.optimizer.run(z0, loss, examples_per_candidate=size, seed=local.instructions.seed)
        model.load_state_dict({name: result.params}, strict=True)
        result.stats.extra["mean_abs_projected_grad"] = float(result.projected_grads.abs().mean())
        return result.stats

    def _train_in_place(
        self, model: PromptModule, data: TensorData, instructions: FitInstructions
    ) -> OptimizationStats:
        tensors = [p for p in model.parameters() if p.requires_grad]
        generator = torch_generator(instructions.seed)
        size = len(data) if self.score_on == "local-set" else min(self.batch_size, len(data))

        def mean_loss(batches: list[dict[str, torch.Tensor]]) -> float:
            total = sum(
                float(F.cross_entropy(model(b).float(), b["labels"], reduction="sum")) for b in batches
            )
            return total / size

        whole = self.score_on == "local-set"
        local_set = list(data.batches(self.batch_size, device=self.device)) if whole else []

        def step_loss(step: int) -> Callable[[], float]:
            if whole:
                return lambda: mean_loss(local_set)
            index = torch.randperm(len(data), generator=generator)[:size]
            batch = next(data.subset(index.numpy()).batches(size, device=self.device))
            return lambda: mean_loss([batch])

        spsa = InPlaceSPSA(self.optimizer.settings)
        model.eval()
        with torch.inference_mode():
            result = spsa.run(tensors, step_loss, examples_per_candidate=size, seed=instructions.seed)
        result.stats.extra["mean_abs_projected_grad"] = float(result.projected_grads.abs().mean())
        return result.stats


class KSeedTrainer(_BlackBoxTrainer):
    """Owns a client's FedKSeed round: S SPSA steps from the prompt it starts at, each along the
    direction u of a seed drawn from the shared pool (``KSeedSetup.pool``; u in float64 on the CPU)
    uniformly, or with the probabilities the server sent (FedKSeed-Pro), θ ± εu scored on the same
    fresh batch of ``batch_size`` local examples:
    ĝ = (L(θ + εu) − L(θ − εu)) / 2ε, rounded to float32 (what travels), then θ ← θ − η·ĝ·u in
    float64 (``optimizers.seed_pool``), the module finally set to θ in float32. The server's replay
    of the pairs therefore gives this module's prompt bit for bit. A step whose |ĝ| exceeds
    ``max_projected_grad`` is skipped and sent as ĝ = 0 (the reference's loss-gap clip).

    Any prompt module: one whose state is a single vector it scores through ``population_losses``
    (an intrinsic z, also behind a remote backbone) gets both candidates in one call; any other
    (soft, deep) is loaded with each candidate and run forward under ``torch.inference_mode``.
    The pairs go up as ``OptimizationStats.tensors`` (``seed_index``, ``projected_grad``).
    """

    def __init__(self, setup: KSeedSetup, batch_size: int, device: torch.device | str) -> None:
        super().__init__(batch_size, device, "batch")
        self.setup = setup

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        _no_penalty(local)
        setup, pool = self.setup, self.setup.pool
        state = model.state_dict()
        names = sorted(state)
        theta = [state[name].detach().to("cpu", torch.float64).clone() for name in names]
        probabilities = None
        if setup.seed_sampling == "importance":
            if SEED_PROBABILITIES not in local.instructions.extras:
                raise ValueError(f"FedKSeed-Pro's server sent no {SEED_PROBABILITIES!r}")
            probabilities = local.instructions.extras[SEED_PROBABILITIES]
        indices = pool.sample(
            setup.steps, torch_generator(derive_seed(local.instructions.seed, "kseed-seeds")), probabilities
        )
        batches = torch_generator(local.instructions.seed)
        size = min(self.batch_size, len(data))
        score = self._scorer(model, names)
        grads: list[float] = []
        stats = OptimizationStats()
        loss_sum, skipped = 0.0, 0
        model.eval()
        with torch.inference_mode():
            for step, index in enumerate(indices):
                rows = torch.randperm(len(data), generator=batches)[:size]
                batch = next(data.subset(rows.numpy()).batches(size, device=self.device))
                u = pool.directions(index, theta)
                plus = [t + setup.epsilon * d for t, d in zip(theta, u, strict=True)]
                minus = [t - setup.epsilon * d for t, d in zip(theta, u, strict=True)]
                losses = checked_losses(score([plus, minus], batch), 2, f"FedKSeed step {step}").tolist()
                grad = float(torch.tensor((losses[0] - losses[1]) / (2 * setup.epsilon), dtype=torch.float32))
                if abs(grad) > setup.max_projected_grad:
                    grad, skipped = 0.0, skipped + 1
                if grad != 0.0:
                    step_along_(theta, u, step_coefficient(setup.lr, 1.0, grad))
                grads.append(grad)
                stats.steps += 1
                stats.examples += size
                stats.queries += 2 * size
                stats.final_loss = (losses[0] + losses[1]) / 2
                loss_sum += stats.final_loss
        model.load_state_dict(
            {n: t.to(torch.float32) for n, t in zip(names, theta, strict=True)}, strict=True
        )
        stats.mean_loss = loss_sum / stats.steps
        stats.extra.update(
            {"skipped_steps": float(skipped), "mean_abs_projected_grad": sum(map(abs, grads)) / len(grads)}
        )
        stats.tensors = {
            SEED_INDEX: torch.tensor(indices, dtype=torch.float32),
            PROJECTED_GRAD: torch.tensor(grads, dtype=torch.float32),
        }
        return stats

    @staticmethod
    def _scorer(
        model: PromptModule, names: list[str]
    ) -> Callable[[list[list[torch.Tensor]], dict[str, torch.Tensor]], torch.Tensor]:
        """The mean cross-entropy [P] of candidate states (tensor lists in ``names`` order) on a batch."""
        if _is_one_vector(model):
            module = model  # one vector, scored for every candidate in one population call

            def population(
                candidates: list[list[torch.Tensor]], batch: dict[str, torch.Tensor]
            ) -> torch.Tensor:
                stacked = torch.stack([c[0] for c in candidates]).to(torch.float32)
                return module.population_losses(stacked, batch).detach().cpu()

            return population

        def one_by_one(candidates: list[list[torch.Tensor]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
            losses = []
            for candidate in candidates:
                model.load_state_dict({n: t.to(torch.float32) for n, t in zip(names, candidate, strict=True)})
                losses.append(float(F.cross_entropy(model(batch).float(), batch["labels"])))
            return torch.tensor(losses, dtype=torch.float64)

        return one_by_one


def _is_one_vector(model: PromptModule) -> bool:
    """Whether the module scores candidate vectors and its prompt state is that one vector."""
    if not isinstance(model, PopulationModule):
        return False
    state = model.state_dict()
    return len(state) == 1 and next(iter(state.values())).dim() == 1


def _no_penalty(context: LocalRound | None) -> None:
    if context is not None and context.penalty is not None:
        raise ValueError("black-box optimisers cannot add a gradient term to the local loss")


def build_blackbox_trainer(
    optimizer: CMAESOptimizerConfig | SPSAOptimizerConfig,
    strategy: StrategyConfig,
    device: torch.device | str,
    kseed: KSeedSetup | None = None,
) -> LocalTrainer:
    """The black-box trainer an optimizer configuration describes (FedBPT's clients report their
    search; FedKSeed's, given its ``kseed`` setup, step along the shared seed pool)."""
    if kseed is not None:
        return KSeedTrainer(kseed, optimizer.batch_size, device)
    if isinstance(optimizer, CMAESOptimizerConfig):
        settings = CMAESSettings(
            popsize=optimizer.popsize,
            sigma=optimizer.sigma,
            budget=optimizer.budget,
            fixed_generations=optimizer.generations,
        )
        return CMAESTrainer(
            CMAESOptimizer(settings),
            optimizer.batch_size,
            device,
            report_search_state=isinstance(strategy, FedBPTConfig),
            score_on=optimizer.score_on,
        )
    settings = SPSASettings(lr=optimizer.lr, epsilon=optimizer.epsilon, budget=optimizer.budget)
    return SPSATrainer(SPSAOptimizer(settings), optimizer.batch_size, device, optimizer.score_on)
