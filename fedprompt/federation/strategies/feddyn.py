"""FedDyn (Acar et al. 2021): dynamic regularisation, so the clients' local optima line up with the
global one.

Client k keeps g_k (its carried state ``dynamic/<name>``, zero at first), the gradient of its local
loss where its previous round ended. From the server's θ it minimises

    L_k(θ) − ⟨g_k, θ − θ_server⟩ + (α/2)·‖θ − θ_server‖²

(the paper's −⟨g_k, θ⟩, shifted by a constant so the term is 0 where the round starts), ends at
θ_k and sets g_k ← g_k − α(θ_k − θ_server), the first-order condition of that minimum. The server,
with P the clients whose updates it used and m all clients, keeps h (zero at first):

    h ← h − α·(1/m)·Σ_{k∈P} (θ_k − θ_server),      θ_server ← (1/|P|)·Σ_{k∈P} θ_k − h/α.

As in the paper every client counts once, whatever its example count, and h stays the mean of
all m clients' g_k. α reaches the clients as ``feddyn_alpha`` in their instructions. Only the
wire prompt takes part: both terms, g_k and h are shaped like it. g_k comes from the client's
unclipped θ_k, so the configuration refuses bounds that clip θ_k after it (a server-side
``robustness.max_update_norm``, local DP), which would break h = mean g_k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedprompt.federation.client_rules import ClientRule, Penalty, RoundInputs, RoundOutput
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import (
    check_same_layout,
    load_with_prefix,
    weighted_sum,
    with_prefix,
    zeros_like_state,
)
from optimizers.base import OptimizationStats

DYNAMIC = "dynamic/"
"""Carried-state prefix of a client's g_k."""
ALPHA = "feddyn_alpha"
_SERVER_PREFIX = "h/"


class FedDyn(Strategy):
    """The FedDyn server: owns h (float32, shaped like the wire prompt), α and the number of clients m."""

    def __init__(self, num_clients: int, alpha: float = 0.01) -> None:
        if num_clients < 1:
            raise ValueError(f"FedDyn needs num_clients >= 1, got {num_clients}")
        if not alpha > 0:
            raise ValueError(f"FedDyn alpha must be > 0, got {alpha}")
        self.num_clients = num_clients
        self.alpha = alpha
        self._h: State = {}

    def initialize(self, global_state: State) -> None:
        if not self._h:
            self._h = zeros_like_state(global_state)

    def client_config(self) -> dict[str, float]:
        """α, the weight of the clients' dynamic regulariser."""
        return {ALPHA: self.alpha}

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        check_same_layout("FedDyn", self._h, global_state)
        if len(updates) > self.num_clients:
            raise ValueError(f"FedDyn got {len(updates)} updates from {self.num_clients} clients")
        mean = weighted_sum(updates, [1 / len(updates)] * len(updates), lambda u: u.state)
        drift = weighted_sum(
            updates,
            [1.0] * len(updates),
            lambda u: {n: u.state[n].double() - global_state[n].double() for n in global_state},
        )
        h = {n: self._h[n].double() - self.alpha / self.num_clients * drift[n] for n in global_state}
        self._h = {n: t.to(torch.float32) for n, t in h.items()}
        return {n: (mean[n] - self._h[n].double() / self.alpha).to(torch.float32) for n in global_state}

    def state_dict(self) -> State:
        """h as ``h/<tensor>``."""
        return with_prefix(self._h, _SERVER_PREFIX)

    def load_state_dict(self, state: State) -> None:
        """Restore h; an empty state resets it to zero."""
        h = load_with_prefix(state, [_SERVER_PREFIX], "FedDyn")[_SERVER_PREFIX]
        if h and self._h:
            check_same_layout("FedDyn", h, self._h)
        self._h = h if h else {n: torch.zeros_like(t) for n, t in self._h.items()}


class FedDynRule(ClientRule):
    """FedDyn's client side: the dynamic regulariser on the local loss, and g_k carried from round
    to round as ``dynamic/<name>``. Owns nothing; α comes with the instructions."""

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        alpha = _alpha(inputs.instructions)
        anchor = {n: t.detach().clone() for n, t in inputs.downlink.items()}
        linear = _linear_terms(inputs.carried, inputs.downlink)

        def dynamic(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
            total = 0.0
            for n, a in anchor.items():
                diff = params[n] - a.to(params[n].device)
                total = total - (linear[n].to(diff.device) * diff).sum() + alpha / 2 * diff.square().sum()
            return total

        return dynamic

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        alpha = _alpha(inputs.instructions)
        linear = _linear_terms(inputs.carried, inputs.downlink)
        new: State = {}
        for n in inputs.downlink:
            moved = trained[n].detach().to("cpu", torch.float64) - inputs.downlink[n].detach().to(
                "cpu", torch.float64
            )
            new[DYNAMIC + n] = (linear[n].double() - alpha * moved).to(torch.float32)
        return RoundOutput(trained, {}, new)


def _alpha(instructions: FitInstructions) -> float:
    alpha = float(instructions.client_config.get(ALPHA, 0.0))
    if not alpha > 0:
        raise ValueError(f"FedDyn's client needs {ALPHA} > 0 from the server, got {alpha}")
    return alpha


def _linear_terms(carried: State, like: State) -> State:
    """g_k from the carried state (zeros in the client's first round)."""
    return {
        n: carried[DYNAMIC + n].detach().to("cpu", torch.float32)
        if DYNAMIC + n in carried
        else torch.zeros(like[n].shape, dtype=torch.float32)
        for n in like
    }
