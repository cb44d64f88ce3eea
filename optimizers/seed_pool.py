"""FedKSeed's shared pool of K seeds (Qin et al. 2024): the seeded directions, steps along them,
the replay of (seed index, projected gradient) pairs, and FedKSeed-Pro's seed probabilities.

Seed k of a pool is the pair (pool seed, k): its direction u_k ~ N(0, I) over a list of tensors is
one stream of float64 standard normals, NumPy's ``Generator(PCG64(SeedSequence([pool seed, k])))
.standard_normal`` (PCG64 and SeedSequence are specified algorithms with fixed streams), cut into
the tensors' shapes in order, on the CPU. It depends on no PyTorch random stream, so every party
that knows the pool seed makes the same u_k whatever its PyTorch release or device; and
``fingerprint`` hashes the first directions, so parties can check that they agree before any step.
A zeroth-order step along seed k with projected gradient ĝ is θ ← θ − c·u_k with
c = η·(w·ĝ) (w: the step's aggregation weight, 1 on the client that took it), computed as a float64
product and a float64 subtraction: the client's local steps and any replay of the same pairs run
the same arithmetic, so they agree bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

FINGERPRINT_SEEDS = 4
"""How many of the pool's first directions a fingerprint hashes."""


class SeedPool:
    """Owns the pool seed and the pool size K: the K directions a federation may step along."""

    def __init__(self, seed: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"a seed pool needs at least one seed, got size {size}")
        self.seed = seed
        self.size = size

    def directions(self, index: int, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """u_index over tensors of ``like``'s shapes, float64 on the CPU: one PCG64 stream of standard
        normals seeded by ``SeedSequence([pool seed, index])``, cut into the shapes in order."""
        if not 0 <= index < self.size:
            raise IndexError(f"seed index {index} is outside the pool [0, {self.size})")
        sizes = [int(np.prod(t.shape, dtype=np.int64)) for t in like]
        stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed % 2**63, index])))
        values = torch.from_numpy(stream.standard_normal(sum(sizes), dtype=np.float64))
        return [piece.reshape(t.shape) for piece, t in zip(values.split(sizes), like, strict=True)]

    def fingerprint(self, like: Sequence[torch.Tensor]) -> int:
        """A 52-bit hash of the first directions over tensors of ``like``'s shapes (exact as a float64),
        so parties can check that they step along the same directions."""
        shapes = [tuple(t.shape) for t in like]
        digest = hashlib.sha256(f"{self.seed}/{self.size}/{shapes}".encode())
        for index in range(min(self.size, FINGERPRINT_SEEDS)):
            for direction in self.directions(index, like):
                digest.update(direction.numpy().astype("<f8").tobytes())
        return int(digest.hexdigest()[:13], 16)

    def sample(
        self, count: int, generator: torch.Generator, probabilities: torch.Tensor | None = None
    ) -> list[int]:
        """``count`` seed indices drawn with replacement from the pool: uniformly, or with the given
        probabilities [K] (FedKSeed-Pro)."""
        if probabilities is None:
            return torch.randint(self.size, (count,), generator=generator).tolist()
        weights = probabilities.detach().to("cpu", torch.float64).reshape(-1)
        valid = bool(torch.isfinite(weights).all()) and not bool((weights < 0).any())
        if weights.numel() != self.size or not valid:
            raise ValueError(f"seed probabilities must be {self.size} finite non-negative values")
        if not float(weights.sum()) > 0:
            raise ValueError("seed probabilities sum to zero")
        return torch.multinomial(weights, count, replacement=True, generator=generator).tolist()


def importance_probabilities(amplitude_sum: torch.Tensor, amplitude_count: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro's seed probabilities: a_k = the mean |ĝ| seen for seed k (its history starting at
    one 0), min-max normalised to [0, 1], then p = softmax(a) (float64)."""
    amplitude = amplitude_sum.double() / amplitude_count.double()
    spread = float(amplitude.max() - amplitude.min())
    return torch.softmax((amplitude - amplitude.min()) / (spread + 1e-10), dim=0)


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
