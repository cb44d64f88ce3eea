"""Averaging: FedAvg (example-weighted or uniform), and FedProx (FedAvg on the server, a proximal
term on clients)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy

Weighting = Literal["examples", "uniform"]
WEIGHTINGS: tuple[Weighting, ...] = ("examples", "uniform")


def weighted_mean(
    updates: Sequence[Update], reference: State | None = None, weighting: Weighting = "examples"
) -> State:
    """Σ_k w_k (θ_k − reference) / Σ_k w_k for every tensor, in float64 on CPU.

    ``weighting``: ``examples`` gives w_k = n_k (the client's example count), ``uniform`` w_k = 1
    (each client counts once, as FedTPG's and PromptFL's reference code average). ``reference``
    defaults to zero (the plain weighted mean of the states). Each product w_k·θ_k is exact in
    float64 and the sum runs in the given order, so the result is deterministic.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; use one of {list(WEIGHTINGS)}")
    weights = [update.num_examples if weighting == "examples" else 1 for update in updates]
    total = sum(weights)
    names = updates[0].state.keys()
    sums = {name: torch.zeros(updates[0].state[name].shape, dtype=torch.float64) for name in names}
    for update, weight in zip(updates, weights, strict=True):
        for name in names:
            value = update.state[name].detach().to("cpu", torch.float64)
            if reference is not None:
                value = value - reference[name].detach().to("cpu", torch.float64)
            sums[name] += weight * value
    return {name: value / total for name, value in sums.items()}


class FedAvg(Strategy):
    """Mean of the client states, θ = Σ_k w_k θ_k / Σ_k w_k, with w_k = n_k (``examples``, the
    default) or w_k = 1 (``uniform``). Owns its weighting, no server state."""

    def __init__(self, weighting: Weighting = "examples") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"FedAvg weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        mean = weighted_mean(updates, weighting=self.weighting)
        return {name: mean[name].to(torch.float32) for name in global_state}


class FedProx(FedAvg):
    """FedAvg on the server; owns ``mu``, which clients use for their (mu/2)·‖θ_k − θ‖² term."""

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def client_config(self) -> dict[str, float]:
        """The proximal coefficient the clients add to their local loss."""
        return {"proximal_mu": self.mu}
