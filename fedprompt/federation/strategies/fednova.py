"""FedNova (Wang et al. 2020): normalised averaging for clients that take different numbers of
local steps, so a client with more data no longer pulls the global prompt further than its weight.

Client i reports ``steps`` τ_i (validated against what the server can bound). With SGD of momentum
ρ its local updates add up to η·a_i gradients, a_i = [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)]/(1 − ρ) (τ_i
without momentum; the paper's ‖a_i‖₁). The server, with p_i = n_i/Σn over the round's clients:

    d_i = (θ_i − θ)/a_i,   τ_eff = Σ_i p_i a_i,   θ ← θ + τ_eff · Σ_i p_i d_i.

When every a_i is the same this is FedAvg. The learning rate is the same for every client of a
round (schedules change it between rounds only), so it cancels. AdamW takes steps of about η
each whatever the gradient's size, so with AdamW a_i = τ_i (normalising by the step count), which
the paper does not cover. τ_i counts the steps taken (a step that fp16 loss scaling skipped moved
nothing), and a_i reads them all with one momentum ρ, so the configuration refuses prompts whose
parts have momenta of their own (twin and VQA prompts with per-part ``momentum``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import example_weights, weighted_sum

STEPS = "steps"


@dataclass(frozen=True)
class LocalStepBound:
    """The most local steps a client holding n training examples takes in a round:
    min(max_steps, epochs·⌈n / batch_size⌉)."""

    epochs: int
    batch_size: int
    max_steps: int | None = None

    def __call__(self, num_examples: int) -> int:
        steps = self.epochs * math.ceil(num_examples / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)


def normalizer(steps: int, momentum: float) -> float:
    """a_i for ``steps`` local SGD steps of momentum ρ: [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(Strategy):
    """The FedNova server: owns the local-step bound and the clients' momentum ρ (0 for AdamW or
    plain SGD), which give each client's a_i from its reported steps. Keeps no state across rounds."""

    def __init__(self, bound: LocalStepBound, momentum: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"FedNova momentum must be in [0, 1), got {momentum}")
        self.bound = bound
        self.momentum = momentum
        self.last_tau_eff: float | None = None

    def validate_update(self, update: Update) -> None:
        """An update must report a whole number of steps from 1 to the bound for its claimed count."""
        steps = update.metrics.get(STEPS)
        if steps is None:
            raise ValueError("FedNova needs the client's 'steps' metric")
        limit = self.bound(update.num_examples)
        if steps != int(steps) or not 1 <= steps <= limit:
            raise ValueError(
                f"steps is {steps}; a client with {update.num_examples} examples takes a whole number of "
                f"steps from 1 to {limit} a round"
            )

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        weights = example_weights(updates)
        # the weight was clamped after validation: bound the steps by the count the server accepted
        a = [
            normalizer(min(int(u.metrics[STEPS]), self.bound(u.num_examples)), self.momentum) for u in updates
        ]
        tau_eff = sum(p * a_i for p, a_i in zip(weights, a, strict=True))
        normalized = weighted_sum(
            updates,
            [p / a_i for p, a_i in zip(weights, a, strict=True)],
            lambda u: {n: u.state[n].double() - global_state[n].double() for n in global_state},
        )
        self.last_tau_eff = tau_eff
        return {
            n: (global_state[n].detach().to("cpu", torch.float64) + tau_eff * normalized[n]).to(torch.float32)
            for n in global_state
        }

    def report(self) -> dict[str, Any]:
        """τ_eff of the last aggregation."""
        return {} if self.last_tau_eff is None else {"fednova_tau_eff": self.last_tau_eff}
