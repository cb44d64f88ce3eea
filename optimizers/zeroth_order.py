"""Zeroth-order local optimisation: SPSA with seeded perturbations (MeZO-style, FedKSeed-replayable).

Each step draws u ~ N(0, I) from a seed derived from (run seed, step), scores θ + εu and θ − εu
on the same examples, estimates the directional derivative ĝ = (L(θ + εu) − L(θ − εu)) / (2ε)
and steps θ ← θ − η·ĝ·u. Two forward passes per step, no backward pass. Because u is a function
of its seed, the trajectory is the list of projected gradients ĝ: ``replay`` rebuilds θ from θ_0,
the seed and the ĝ alone.

Two forms: ``SPSAOptimizer`` on one vector through a population call (both candidates in one
call; an intrinsic prompt's z, a remote backbone), kept in float64; and ``InPlaceSPSA`` on any
set of parameter tensors, perturbed in place as MeZO does: u is regenerated from its seed,
tensor by tensor, each time it is needed (θ + εu, then − 2εu, then + (ε − ηĝ)u), so no copy of θ
or u is ever held; ``replay_in_place`` repeats that arithmetic bit for bit.

Budget: in model queries (one candidate on one example), so a step on a batch of B examples
costs 2·B queries and a run does ``budget // (2·B)`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from optimizers.base import OptimizationStats, checked_losses

PopulationLoss = Callable[[torch.Tensor], torch.Tensor]
"""Maps candidates ``[P, d]`` (float32) to their losses ``[P]``, all on the same examples."""


@dataclass(frozen=True)
class SPSASettings:
    """SPSA knobs: learning rate η, perturbation size ε, budget in model queries."""

    lr: float = 0.1
    epsilon: float = 1e-2
    budget: int = 1024

    def __post_init__(self) -> None:
        for name in ("lr", "epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SPSA {name} must be a positive number, got {value}")
        if self.budget < 1:
            raise ValueError(f"SPSA budget must be a positive number of queries, got {self.budget}")

    def steps(self, examples_per_candidate: int) -> int:
        """Steps the budget pays for when each candidate is scored on that many examples."""
        if examples_per_candidate < 1:
            raise ValueError(f"examples_per_candidate must be >= 1, got {examples_per_candidate}")
        if self.budget < 2 * examples_per_candidate:
            raise ValueError(
                f"a budget of {self.budget} queries is less than one SPSA step: 2 × {examples_per_candidate} "
                "examples; raise the budget or lower the batch size"
            )
        return self.budget // (2 * examples_per_candidate)


@dataclass
class SPSAResult:
    """The final parameters, the projected gradient ĝ of every step (with the seed, all it takes to
    replay the run), and stats."""

    params: torch.Tensor
    projected_grads: torch.Tensor
    stats: OptimizationStats


def perturbation(seed: int, step: int, dim: int) -> torch.Tensor:
    """The direction u_step ~ N(0, I_dim) of one step, a pure function of (seed, step)."""
    words = np.random.SeedSequence([seed % 2**63, step]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(words[0]) << 32) | int(words[1]))
    return torch.randn(dim, generator=generator, dtype=torch.float64)


def replay(x0: torch.Tensor, seed: int, projected_grads: torch.Tensor, lr: float) -> torch.Tensor:
    """θ after the steps whose projected gradients are given: θ_0 − η Σ_t ĝ_t u_t (u_t from the seed)."""
    theta = x0.detach().to("cpu", torch.float64).clone()
    for step, grad in enumerate(projected_grads.tolist()):
        theta -= lr * grad * perturbation(seed, step, theta.numel())
    return theta.to(torch.float32)


class SPSAOptimizer:
    """Owns a seeded SPSA run: two-point estimates along seeded Gaussian directions.

    Errors surface: an exception of the loss, a loss of the wrong shape, or a non-finite one.
    """

    def __init__(self, settings: SPSASettings) -> None:
        self.settings = settings

    def run(
        self,
        x0: torch.Tensor,
        population_loss: PopulationLoss,
        *,
        examples_per_candidate: int,
        seed: int,
    ) -> SPSAResult:
        """Minimise from ``x0`` [d]; the parameters are kept in float64 between steps."""
        if x0.dim() != 1 or x0.numel() < 1:
            raise ValueError(f"SPSA needs a non-empty vector, got shape {tuple(x0.shape)}")
        lr, eps = self.settings.lr, self.settings.epsilon
        theta = x0.detach().to("cpu", torch.float64).clone()
        grads: list[float] = []
        stats = OptimizationStats()
        loss_sum = 0.0
        for step in range(self.settings.steps(examples_per_candidate)):
            u = perturbation(seed, step, theta.numel())
            pair = torch.stack([theta + eps * u, theta - eps * u]).to(torch.float32)
            plus, minus = checked_losses(population_loss(pair), 2, f"SPSA step {step}").tolist()
            grad = (plus - minus) / (2 * eps)
            theta -= lr * grad * u
            grads.append(grad)
            stats.steps += 1
            stats.examples += examples_per_candidate
            stats.queries += 2 * examples_per_candidate
            loss_sum += (plus + minus) / 2
            stats.final_loss = (plus + minus) / 2
        stats.mean_loss = loss_sum / stats.steps
        return SPSAResult(theta.to(torch.float32), torch.tensor(grads, dtype=torch.float64), stats)


def tensor_directions(seed: int, step: int, tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The direction u_step ~ N(0, I) of one step over several tensors, one piece per tensor (its
    shape, dtype and device), generated in order from one generator seeded by (seed, step): a pure
    function of (seed, step) and the tensors' shapes, made again on every call."""
    words = np.random.SeedSequence([seed % 2**63, step]).generate_state(2, dtype=np.uint32)
    generator_seed = (int(words[0]) << 32) | int(words[1])
    generators: dict[torch.device, torch.Generator] = {}
    for tensor in tensors:
        if tensor.device not in generators:
            generators[tensor.device] = torch.Generator(device=tensor.device).manual_seed(generator_seed)
        yield torch.randn(
            tensor.shape, generator=generators[tensor.device], dtype=tensor.dtype, device=tensor.device
        )


def move_along_(tensors: Sequence[torch.Tensor], seed: int, step: int, scale: float) -> None:
    """θ ← θ + scale·u_step in place, u regenerated from its seed (``tensor_directions``)."""
    for tensor, direction in zip(tensors, tensor_directions(seed, step, tensors), strict=True):
        tensor.add_(direction, alpha=scale)


def replay_in_place(
    tensors: Sequence[torch.Tensor], seed: int, projected_grads: torch.Tensor, lr: float, epsilon: float
) -> None:
    """Repeat an ``InPlaceSPSA`` run on ``tensors`` (set to its θ_0) from its seed and ĝ alone: the
    same in-place arithmetic, so the result is bit-identical to the run's."""
    with torch.no_grad():
        for step, grad in enumerate(projected_grads.tolist()):
            _spsa_moves(tensors, seed, step, epsilon, lr * grad)


def _spsa_moves(tensors: Sequence[torch.Tensor], seed: int, step: int, epsilon: float, update: float) -> None:
    move_along_(tensors, seed, step, epsilon)
    move_along_(tensors, seed, step, -2 * epsilon)
    move_along_(tensors, seed, step, epsilon - update)


StepLoss = Callable[[int], Callable[[], float]]
"""Given a step index, the loss of the current parameters on that step's examples (called twice)."""


class InPlaceSPSA:
    """Owns an SPSA run over parameter tensors perturbed in place (MeZO). Per step: θ += εu and
    score, θ −= 2εu and score, then θ += (ε − ηĝ)u, which restores θ (up to rounding) and steps it
    by −ηĝu. Call it under ``torch.inference_mode`` (or ``no_grad``).

    Errors surface: an exception of the loss, or a loss that is not finite.
    """

    def __init__(self, settings: SPSASettings) -> None:
        self.settings = settings

    def run(
        self,
        tensors: Sequence[torch.Tensor],
        step_loss: StepLoss,
        *,
        examples_per_candidate: int,
        seed: int,
    ) -> SPSAResult:
        """Minimise in place; ``SPSAResult.params`` is the final θ flattened (float32, CPU)."""
        if not tensors or sum(t.numel() for t in tensors) < 1:
            raise ValueError("SPSA needs at least one non-empty tensor to perturb")
        lr, eps = self.settings.lr, self.settings.epsilon
        grads: list[float] = []
        stats = OptimizationStats()
        loss_sum = 0.0
        for step in range(self.settings.steps(examples_per_candidate)):
            evaluate = step_loss(step)
            move_along_(tensors, seed, step, eps)
            plus = evaluate()
            move_along_(tensors, seed, step, -2 * eps)
            minus = evaluate()
            pair = checked_losses(torch.tensor([plus, minus]), 2, f"SPSA step {step}").tolist()
            grad = (pair[0] - pair[1]) / (2 * eps)
            move_along_(tensors, seed, step, eps - lr * grad)
            grads.append(grad)
            stats.steps += 1
            stats.examples += examples_per_candidate
            stats.queries += 2 * examples_per_candidate
            loss_sum += (pair[0] + pair[1]) / 2
            stats.final_loss = (pair[0] + pair[1]) / 2
        stats.mean_loss = loss_sum / stats.steps
        params = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])
        return SPSAResult(params, torch.tensor(grads, dtype=torch.float64), stats)
