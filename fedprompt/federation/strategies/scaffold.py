"""SCAFFOLD (Karimireddy et al. 2020, option II) on the prompt: control variates correct each
client's drift toward its own optimum.

Server: control variate c, client i: c_i, both shaped like the wire prompt. Each round the server
sends x (the global prompt) and c (downlink extras ``control/<name>``); client i trains from x
with the corrected gradient g + c − c_i, ending at y_i after K local steps at learning rate η_l,
then sets c_i⁺ = c_i − c + (x − y_i)/(K·η_l), keeps c_i⁺ (carried state ``control/<name>``) and
sends y_i and Δc_i = c_i⁺ − c_i (uplink extras ``control/<name>``). Both directions thus carry
twice the prompt, and the bytes count it. The server, with S the clients whose updates it used
and N all clients:

    x ← x + η_g · Σ_{i∈S} w_i (y_i − x),      c ← c + (|S|/N) · Σ_{i∈S} w_i Δc_i,

w_i = n_i/Σ_{j∈S} n_j (the example weights every fedprompt average uses; with equal counts this
is the paper's plain mean, and with every client every round c stays Σ_i w_i c_i exactly).

The correction is a linear term ⟨c − c_i, θ − x⟩ on the local loss (its gradient is c − c_i; it is
0 where the round starts, so the reported loss stays comparable), so it travels the same path as
the gradient: with plain SGD that is exactly the paper's g + c − c_i; momentum SGD accumulates it
with the gradient, and (x − y_i) is then divided by the optimiser's ``gradient_scale``
(Σ_k η_k(1 − β^(k+1))/(1 − β), which is K·η_l without momentum), so c_i⁺ stays an average
gradient; gradient clipping clips g + c − c_i together. So unless a configuration sets them, a
SCAFFOLD run's optimiser takes the paper's plain steps (``momentum: 0``, ``grad_clip: null``: the
strategy's ``optimizer_defaults``), and a run that sets others says at start that it departs from
the paper. Steps that fp16 loss scaling skipped count neither in K nor in the gradient scale.
AdamW rescales every coordinate, so (x − y_i)/(K·η_l) is no gradient at all: the configuration
refuses SCAFFOLD without ``optimizer.algorithm: sgd``. c_i⁺ comes from the unclipped y_i, so the
configuration also refuses a server-side norm bound (``robustness.max_update_norm``) with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedprompt.federation.client_rules import ClientRule, Penalty, RoundInputs, RoundOutput
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import (
    check_same_layout,
    example_weights,
    load_with_prefix,
    weighted_sum,
    with_prefix,
    zeros_like_state,
)
from optimizers.base import OptimizationStats

CONTROL = "control/"
"""Prefix of the control variates: downlink and uplink extras, and the client's carried state."""
_SERVER_PREFIX = "c/"


class Scaffold(Strategy):
    """The SCAFFOLD server: owns c (float32, shaped like the wire prompt), the server learning rate
    η_g and the number of clients N."""

    def __init__(self, num_clients: int, server_lr: float = 1.0) -> None:
        if num_clients < 1:
            raise ValueError(f"SCAFFOLD needs num_clients >= 1, got {num_clients}")
        if not server_lr > 0:
            raise ValueError(f"SCAFFOLD server_lr must be > 0, got {server_lr}")
        self.num_clients = num_clients
        self.server_lr = server_lr
        self._c: State = {}

    def initialize(self, global_state: State) -> None:
        if not self._c:
            self._c = zeros_like_state(global_state)

    def downlink_extras(self) -> State:
        """c, as ``control/<name>``."""
        return {CONTROL + name: t.clone() for name, t in self._c.items()}

    def uplink_extras(self) -> dict[str, tuple[int, ...]]:
        """Δc_i, as ``control/<name>``."""
        return {CONTROL + name: tuple(t.shape) for name, t in self._c.items()}

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        check_same_layout("SCAFFOLD", self._c, global_state)
        if len(updates) > self.num_clients:
            raise ValueError(f"SCAFFOLD got {len(updates)} updates from {self.num_clients} clients")
        weights = example_weights(updates)
        delta = weighted_sum(
            updates,
            weights,
            lambda u: {n: u.state[n].double() - global_state[n].double() for n in global_state},
        )
        control = weighted_sum(updates, weights, lambda u: {n: u.extras[CONTROL + n] for n in global_state})
        share = len(updates) / self.num_clients
        self._c = {n: (self._c[n].double() + share * control[n]).to(torch.float32) for n in global_state}
        return {
            n: (global_state[n].detach().to("cpu", torch.float64) + self.server_lr * delta[n]).to(
                torch.float32
            )
            for n in global_state
        }

    def state_dict(self) -> State:
        """c as ``c/<tensor>``."""
        return with_prefix(self._c, _SERVER_PREFIX)

    def load_state_dict(self, state: State) -> None:
        """Restore c; an empty state resets it to zero."""
        c = load_with_prefix(state, [_SERVER_PREFIX], "SCAFFOLD")[_SERVER_PREFIX]
        if c and self._c:
            check_same_layout("SCAFFOLD", c, self._c)
        self._c = c if c else {n: torch.zeros_like(t) for n, t in self._c.items()}


def _controls(tensors: Mapping[str, torch.Tensor], like: State) -> State:
    """The ``control/<name>`` tensors of ``tensors`` for every name of ``like`` (zeros when absent:
    a client's first round)."""
    return {
        n: tensors[CONTROL + n].detach().to("cpu", torch.float32)
        if CONTROL + n in tensors
        else torch.zeros(like[n].shape, dtype=torch.float32)
        for n in like
    }


class ScaffoldRule(ClientRule):
    """SCAFFOLD's client side: adds ⟨c − c_i, θ⟩ to the local loss, then updates c_i (carried as
    ``control/<name>``) by option II and sends Δc_i up. Owns nothing: c comes down with the round,
    c_i lives in the client's carried state."""

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        server = _controls(inputs.instructions.extras, inputs.downlink)
        own = _controls(inputs.carried, inputs.downlink)
        correction = {n: server[n] - own[n] for n in inputs.downlink}
        anchor = {n: t.detach().clone() for n, t in inputs.downlink.items()}

        def linear(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return sum(
                ((params[n] - anchor[n].to(params[n].device)) * correction[n].to(params[n].device)).sum()
                for n in correction
            )

        return linear

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        scale = stats.gradient_scale
        if scale == 0 and stats.steps == 0:
            raise ValueError(
                "SCAFFOLD's control-variate update needs at least one local step; this client took none "
                "(fp16 loss scaling skipped every step)"
            )
        if scale is None or not scale > 0:
            raise ValueError(
                "SCAFFOLD's control-variate update needs the local optimiser's gradient scale K·η_l, which "
                "only SGD (one learning rate for the whole prompt) reports; set optimizer.algorithm: sgd"
            )
        server = _controls(inputs.instructions.extras, inputs.downlink)
        own = _controls(inputs.carried, inputs.downlink)
        new_own: State = {}
        change: State = {}
        for n in inputs.downlink:
            drift = inputs.downlink[n].detach().to("cpu", torch.float64) - trained[n].detach().to(
                "cpu", torch.float64
            )
            new_own[n] = (own[n].double() - server[n].double() + drift / scale).to(torch.float32)
            change[n] = new_own[n] - own[n]
        return RoundOutput(
            trained,
            {CONTROL + n: t for n, t in change.items()},
            {CONTROL + n: t for n, t in new_own.items()},
        )
