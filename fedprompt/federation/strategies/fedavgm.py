"""Server momentum (FedAvgM, Hsu et al. 2019) and a server learning rate on plain averaging."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fedavg import Weighting, weighted_mean
from fedprompt.federation.strategies.server_tensors import check_same_layout, load_with_prefix, with_prefix

_SERVER_PREFIX = "v/"


class FedAvgM(Strategy):
    """Example-weighted averaging with a server learning rate η and momentum β; owns the momentum
    buffer v (float32, zero before the first round). Each round, with θ the global state:

        Δ = Σ_k w_k (θ_k − θ),   v ← β·v + Δ,   θ ← θ + η·v      (w_k = n_k / Σn, or 1/K uniform)

    β = 0 is FedAvg with a server learning rate (θ ← θ + η·Δ, keeping no state); β = 0 and η = 1 is
    FedAvg itself. Hsu et al. find the effective rate η/(1 − β) ≈ 1 works best.
    """

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, weighting: Weighting = "examples"
    ) -> None:
        if not server_lr > 0:
            raise ValueError(f"FedAvgM server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"FedAvgM momentum must be in [0, 1), got {momentum}")
        self.server_lr = server_lr
        self.momentum = momentum
        self.weighting = weighting
        self._v: State = {}

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        delta = weighted_mean(updates, reference=global_state, weighting=self.weighting)
        if self._v:
            check_same_layout("FedAvgM", self._v, global_state)
        velocity = {
            n: self.momentum * self._v[n].double() + delta[n] if self._v else delta[n] for n in global_state
        }
        if self.momentum > 0:
            self._v = {n: t.to(torch.float32) for n, t in velocity.items()}
        step = self._v if self.momentum > 0 else velocity
        return {
            n: (global_state[n].detach().to("cpu", torch.float64) + self.server_lr * step[n].double()).to(
                torch.float32
            )
            for n in global_state
        }

    def state_dict(self) -> State:
        """v as ``v/<tensor>`` (empty before the first round, and always without momentum)."""
        return with_prefix(self._v, _SERVER_PREFIX)

    def load_state_dict(self, state: State) -> None:
        """Restore v; an empty state resets it."""
        self._v = load_with_prefix(state, [_SERVER_PREFIX], "FedAvgM")[_SERVER_PREFIX]
        if self._v and self.momentum == 0:
            raise ValueError("FedAvgM without momentum keeps no buffer, but the state holds one")
