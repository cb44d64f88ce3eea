"""FedKSeed's shared pool of K seeds (Qin et al. 2024): the seeded directions, steps along them,
and the replay of (seed index, projected gradient) pairs.

Seed k of a pool is the pair (pool seed, k): its direction u_k ~ N(0, I) over a list of tensors is
generated from one generator seeded by ``SeedSequence([pool seed, k])`` (``tensor_directions``),
in float64 on the CPU, so every party that knows the pool seed makes the same u_k, whatever its
device. A zeroth-order step along seed k with projected gradient ĝ is θ ← θ − c·u_k with
c = η·(w·ĝ) (w: the step's aggregation weight, 1 on the client that took it), computed as a float64
product and a float64 subtraction: the client's local steps and any replay of the same pairs run
the same arithmetic, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizers.zeroth_order import tensor_directions


class SeedPool:
    """Owns the pool seed and the pool size K: the K directions a federation may step along."""

    def __init__(self, seed: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"a seed pool needs at least one seed, got size {size}")
        self.seed = seed
        self.size = size

    def directions(self, index: int, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """u_index over tensors of ``like``'s shapes, float64 on the CPU."""
        if not 0 <= index < self.size:
            raise IndexError(f"seed index {index} is outside the pool [0, {self.size})")
        templates = [torch.empty(t.shape, dtype=torch.float64) for t in like]
        return list(tensor_directions(self.seed, index, templates))

    def sample(self, count: int, generator: torch.Generator) -> list[int]:
        """``count`` seed indices drawn uniformly (with replacement) from the pool."""
        return torch.randint(self.size, (count,), generator=generator).tolist()


def step_coefficient(lr: float, weight: float, grad: float) -> float:
    """c = η·(w·ĝ), the multiple of u a step subtracts (w = 1 leaves ĝ exactly as it is)."""
    return lr * (weight * grad)


def step_along_(
    tensors: Sequence[torch.Tensor], directions: Sequence[torch.Tensor], coefficient: float
) -> None:
    """θ ← θ − c·u in place, on float64 tensors: a rounded product, then a rounded subtraction."""
    for tensor, direction in zip(tensors, directions, strict=True):
        tensor.sub_(direction * coefficient)


def replay_pairs_(
    tensors: Sequence[torch.Tensor],
    pool: SeedPool,
    indices: Sequence[int],
    grads: Sequence[float],
    lr: float,
    weight: float = 1.0,
) -> None:
    """Apply the steps (indices[j], grads[j]) in order to float64 ``tensors`` in place; a step whose
    ĝ is 0 (a skipped step) changes nothing and is not generated."""
    if len(indices) != len(grads):
        raise ValueError(f"{len(indices)} seed indices but {len(grads)} projected gradients")
    if any(t.dtype != torch.float64 for t in tensors):
        raise TypeError("the replay runs on float64 tensors")
    for index, grad in zip(indices, grads, strict=True):
        if grad != 0.0:
            step_along_(tensors, pool.directions(index, tensors), step_coefficient(lr, weight, grad))
