"""Example-weighted averaging: FedAvg, and FedProx (FedAvg on the server, a proximal term on clients)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedprompt.state import State, Update
from fedprompt.strategies.base import Strategy


def weighted_mean(updates: Sequence[Update], reference: State | None = None) -> State:
    """Σ_k n_k (θ_k − reference) / Σ_k n_k for every tensor, in float64 on CPU.

    ``reference`` defaults to zero (the plain weighted mean of the states). Each product n_k·θ_k
    is exact in float64 and the sum runs in the given order, so the result is deterministic.
    """
    total = sum(update.num_examples for update in updates)
    names = updates[0].state.keys()
    sums = {name: torch.zeros(updates[0].state[name].shape, dtype=torch.float64) for name in names}
    for update in updates:
        for name in names:
            value = update.state[name].detach().to("cpu", torch.float64)
            if reference is not None:
                value = value - reference[name].detach().to("cpu", torch.float64)
            sums[name] += update.num_examples * value
    return {name: value / total for name, value in sums.items()}


class FedAvg(Strategy):
    """Example-weighted mean of the client states: θ = Σ_k n_k/Σn · θ_k. Owns no server state."""

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        mean = weighted_mean(updates)
        return {name: mean[name].to(torch.float32) for name in global_state}


class FedProx(FedAvg):
    """FedAvg on the server; owns ``mu``, which clients use for their (mu/2)·‖θ_k − θ‖² term."""

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def client_config(self) -> dict[str, float]:
        """The proximal coefficient the clients add to their local loss."""
        return {"proximal_mu": self.mu}
