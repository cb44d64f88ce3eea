"""Local black-box optimisation by CMA-ES (nevergrad's ``ParametrizedCMA`` over pycma).

The optimiser sees a parameter vector and a population loss, nothing else: each generation it
asks for the whole population, evaluates it through one call, and tells every loss back.

Budget: counted in model queries. One query is one candidate evaluated on one example, so a
generation of ``popsize`` candidates on a batch of ``B`` examples costs ``popsize · B`` queries
(what a pay-per-input API would bill). A run does ``budget // (popsize · B)`` generations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import nevergrad as ng
import numpy as np
import torch

from optimizers.base import OptimizationStats, checked_losses

PopulationLoss = Callable[[torch.Tensor], torch.Tensor]
"""Maps candidates ``[P, d]`` (float32) to their losses ``[P]``, all on the same examples."""


@dataclass(frozen=True)
class CMAESSettings:
    """CMA-ES knobs: population size, initial step size σ, and the length of a run: the budget in
    model queries, or a fixed number of generations whatever they cost (``fixed_generations``,
    FedBPT's local iterations; the budget is then not used)."""

    popsize: int = 10
    sigma: float = 1.0
    budget: int | None = 2560
    fixed_generations: int | None = None

    def __post_init__(self) -> None:
        if self.popsize < 2:
            raise ValueError(f"CMA-ES popsize must be at least 2, got {self.popsize}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"CMA-ES sigma must be a positive number, got {self.sigma}")
        if (self.budget is None) == (self.fixed_generations is None):
            raise ValueError("CMA-ES needs a budget in queries or a fixed number of generations, not both")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"CMA-ES budget must be a positive number of queries, got {self.budget}")
        if self.fixed_generations is not None and self.fixed_generations < 1:
            raise ValueError(f"CMA-ES generations must be a positive number, got {self.fixed_generations}")

    def generations(self, examples_per_candidate: int) -> int:
        """Generations of a run when each candidate is scored on that many examples: the fixed
        number, or as many as the budget pays for."""
        if examples_per_candidate < 1:
            raise ValueError(f"examples_per_candidate must be >= 1, got {examples_per_candidate}")
        if self.fixed_generations is not None:
            return self.fixed_generations
        per_generation = self.popsize * examples_per_candidate
        if self.budget < per_generation:
            raise ValueError(
                f"a budget of {self.budget} queries is less than one generation: popsize {self.popsize} "
                f"× {examples_per_candidate} examples = {per_generation}; raise the budget or lower the "
                "popsize or batch size"
            )
        return self.budget // per_generation


@dataclass
class CMAESResult:
    """What one CMA-ES run ends with: the search distribution's mean and step size, the last
    population and its losses, the step size at the start of every generation, the number of
    parents μ of its recombination, why it stopped early (empty when the budget ran out), and stats."""

    mean: torch.Tensor
    sigma: float
    population: torch.Tensor
    losses: torch.Tensor
    sigmas: torch.Tensor
    parents: int
    stopped: str
    stats: OptimizationStats


class CMAESOptimizer:
    """Owns a seeded CMA-ES run from a given mean and step size (a warm start from the global z).

    Uses ``ParametrizedCMA`` explicitly (full covariance, pycma backend, no elitism), never
    nevergrad's ``CMA`` alias, whose variant changes with the budget. The search space is an
    unbounded ``ng.p.Array`` whose initial value is ``x0`` and mutation scale 1, so pycma's σ is
    the step size in parameter units. Every error surfaces: an exception of the loss, a loss of
    the wrong shape or a non-finite one, and a generation that pycma refused (nevergrad swallows
    pycma's errors in ``tell``; this optimiser checks the iteration count after each generation).
    When pycma's own stopping rules fire, the run ends there instead of letting nevergrad restart
    from scratch, and ``CMAESResult.stopped`` says why.
    """

    def __init__(self, settings: CMAESSettings) -> None:
        self.settings = settings

    def run(
        self,
        x0: torch.Tensor,
        population_loss: PopulationLoss,
        *,
        examples_per_candidate: int,
        seed: int,
        sigma: float | None = None,
    ) -> CMAESResult:
        """Minimise from ``x0`` [d] with step size ``sigma`` (default: the settings')."""
        if x0.dim() != 1 or x0.numel() < 2:
            raise ValueError(f"CMA-ES needs a vector of at least 2 entries, got shape {tuple(x0.shape)}")
        step = self.settings.sigma if sigma is None else float(sigma)
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"CMA-ES sigma must be a positive number, got {step}")
        generations = self.settings.generations(examples_per_candidate)
        popsize = self.settings.popsize

        space = ng.p.Array(init=x0.detach().to("cpu", torch.float64).numpy())
        space.random_state = np.random.RandomState(seed % 2**32)
        optimizer = ng.optimizers.ParametrizedCMA(scale=step, popsize=popsize)(space, budget=None)

        stats = OptimizationStats()
        sigmas: list[float] = []
        loss_sum = 0.0
        es = None
        population = losses = torch.empty(0)
        stopped = ""
        for generation in range(generations):
            candidates = [optimizer.ask() for _ in range(popsize)]
            if es is None:
                es = optimizer.es
            elif optimizer.es is not es:
                raise RuntimeError("nevergrad restarted CMA-ES mid-run; the warm start would be lost")
            sigmas.append(float(es.sigma))
            population = torch.from_numpy(np.stack([c.value for c in candidates])).to(torch.float32)
            losses = checked_losses(population_loss(population), popsize, f"generation {generation}")
            for candidate, loss in zip(candidates, losses.tolist(), strict=True):
                optimizer.tell(candidate, loss)
            if es.countiter != generation + 1:
                raise RuntimeError(
                    f"CMA-ES did not accept generation {generation} (pycma's tell failed and nevergrad "
                    "swallowed the error)"
                )
            stats.steps += 1
            stats.queries += popsize * examples_per_candidate
            stats.examples += examples_per_candidate
            loss_sum += float(losses.mean())
            stats.final_loss = float(losses.min())
            stop = es.stop()
            if stop:
                stopped = ", ".join(f"{k}={v}" for k, v in stop.items())
                break
        assert es is not None  # generations >= 1
        stats.mean_loss = loss_sum / stats.steps
        mean = space.spawn_child().set_standardized_data(es.mean).value
        return CMAESResult(
            mean=torch.from_numpy(np.asarray(mean)).to(torch.float32),
            sigma=float(es.sigma),
            population=population,
            losses=losses,
            sigmas=torch.tensor(sigmas, dtype=torch.float64),
            parents=int(es.sp.weights.mu),
            stopped=stopped,
            stats=stats,
        )
