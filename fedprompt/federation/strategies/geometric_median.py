"""RFA (Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022):
the geometric median of the client states, by the smoothed Weiszfeld algorithm."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import flatten, unflatten


class GeometricMedian(Strategy):
    """The point v minimising Σ_k α_k ‖v − θ_k‖ over the client states θ_k (all tensors flattened
    together), α_k = n_k / Σ n (or 1/K with ``weighting: uniform``). Owns ``iterations``, the
    smoothing ``nu`` and the stopping tolerance ``ftol``; keeps no server state.

    Smoothed Weiszfeld, as RFA: β_k = α_k / max(ν, ‖v − θ_k‖), v ← Σ β_k θ_k / Σ β_k, at most
    ``iterations`` times, stopping once the objective falls by less than ``ftol`` of itself. RFA
    starts from the weighted mean; this starts from the coordinate-wise median, so that a few
    states moved arbitrarily far (which drag the mean with them and then take Weiszfeld many
    steps to leave) are outvoted from the first step. Unlike a mean, a minority of the weight moved
    arbitrarily far moves v a bounded distance (breakdown point 1/2), and unlike coordinate-wise
    rules v keeps the states' joint geometry.
    """

    def __init__(
        self, iterations: int = 100, nu: float = 1e-6, weighting: str = "examples", ftol: float = 1e-6
    ) -> None:
        if iterations < 1 or not nu > 0:
            raise ValueError(f"geometric median needs iterations >= 1 and nu > 0, got {iterations}, {nu}")
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.iterations = iterations
        self.nu = nu
        self.weighting = weighting
        self.ftol = ftol

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        points = torch.stack([flatten(update.state) for update in updates])
        counts = [float(u.num_examples) if self.weighting == "examples" else 1.0 for u in updates]
        alpha = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        median = (
            points.median(dim=0).values
            if len(points) % 2
            else points.sort(dim=0).values[len(points) // 2 - 1 : len(points) // 2 + 1].mean(dim=0)
        )
        objective = float(alpha @ (points - median).norm(dim=1))
        for _ in range(self.iterations):
            beta = alpha / (points - median).norm(dim=1).clamp_min(self.nu)
            median = beta @ points / beta.sum()
            previous, objective = objective, float(alpha @ (points - median).norm(dim=1))
            if previous - objective <= self.ftol * objective:
                break
        return unflatten(median, global_state)
