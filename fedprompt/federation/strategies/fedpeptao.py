"""FedPepTAO's adaptive optimisation (Che et al. 2023, "Federated Learning of Large Language Models
with Parameter-Efficient Prompt Tuning and Adaptive Optimization"; reference llm-eff/FedPepTAO).

Device side: each client trains with AdamW whose moments and step counts persist from round to
round (``optimizer.keep_state``, carried as client state). Server side: the drift of each client
is corrected with control variates the *server* keeps per client, so nothing beyond the prompt
and the client's step count τ_i travels, then a momentum step is taken on the corrected average.

With S the round's clients, w_i = n_i/Σ_S n, N all clients, η_l the clients' base learning rate,
θ the global prompt, θ_i client i's, c the server's control variate and c_i client i's (all zero
at first):

    θ̄ = Σ_i w_i θ_i                                   (FedAvg)
    θ̃ = θ̄ − Σ_i w_i τ_i η_l (c − c_i)                 (the SCAFFOLD correction of the round's
                                                         τ_i local steps, applied by the server)
    c_i ← (θ − θ_i)/(τ_i η_l),   c ← c + (|S|/N) Σ_i w_i (c_i⁺ − c_i)
    v ← β v + (1 − β)(θ − θ̃)                          (server momentum on the pseudo-gradient)
    θ ← θ̃ − η_s v,   η_s = max(η_0 · decay^t, η_min)   (t: aggregations so far)

(c_i⁺ is SCAFFOLD's option II for the corrected trajectory θ_i − τ_i η_l (c − c_i): the client's
average step direction of the round.) ``drift_correction: false`` drops the control variates
(θ̃ = θ̄). Where this reads the reference code rather than copies it: the reference's server step
uses the difference of two consecutive pseudo-gradients and starts in round 2, weights Δc by step
counts and divides by a constant learning rate; here the momentum acts on the round's corrected
pseudo-gradient from round 1, Δc is example-weighted as every fedprompt average, and η_l is the
configured base rate (a round schedule does not enter c_i, as in the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fednova import STEPS, LocalStepBound
from fedprompt.federation.strategies.server_tensors import (
    check_same_layout,
    example_weights,
    load_with_prefix,
    weighted_sum,
    with_prefix,
    zeros_like_state,
)

_MOMENTUM, _CONTROL, _CLIENT, _COUNT = "v/", "c/", "ci/", "t/"


class FedPepTAO(Strategy):
    """The FedPepTAO server: owns the momentum v, the control variate c, each client's c_i (server
    state, all shaped like the wire prompt, float32) and the number of aggregations t (for the
    server learning rate's decay); checks each client's reported step count like FedNova."""

    def __init__(
        self,
        num_clients: int,
        bound: LocalStepBound,
        local_lr: float,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        server_lr_decay: float = 0.99,
        min_server_lr: float = 1e-4,
        drift_correction: bool = True,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"FedPepTAO needs num_clients >= 1, got {num_clients}")
        if not (local_lr > 0 and server_lr >= 0 and 0 <= momentum < 1 and 0 < server_lr_decay <= 1):
            raise ValueError(
                f"FedPepTAO needs local_lr > 0, server_lr >= 0, momentum in [0, 1) and decay in (0, 1]; got "
                f"{local_lr}, {server_lr}, {momentum}, {server_lr_decay}"
            )
        self.num_clients = num_clients
        self.bound = bound
        self.local_lr = local_lr
        self.server_lr = server_lr
        self.momentum = momentum
        self.server_lr_decay = server_lr_decay
        self.min_server_lr = min_server_lr
        self.drift_correction = drift_correction
        self._v: State = {}
        self._c: State = {}
        self._clients: dict[int, State] = {}
        self._count = 0
        self.last_server_lr: float | None = None

    def initialize(self, global_state: State) -> None:
        if not self._v:
            self._v = zeros_like_state(global_state)
            self._c = zeros_like_state(global_state)

    def current_server_lr(self) -> float:
        """η_s of the next aggregation: max(η_0 · decay^t, η_min)."""
        return max(
            self.server_lr * self.server_lr_decay**self._count, min(self.min_server_lr, self.server_lr)
        )

    def validate_update(self, update: Update) -> None:
        """An update must report a whole number of steps from 1 to the bound for its claimed count."""
        steps = update.metrics.get(STEPS)
        if steps is None:
            raise ValueError("FedPepTAO needs the client's 'steps' metric")
        limit = self.bound(update.num_examples)
        if steps != int(steps) or not 1 <= steps <= limit:
            raise ValueError(
                f"steps is {steps}; a client with {update.num_examples} examples takes a whole number of "
                f"steps from 1 to {limit} a round"
            )

    def _client_control(self, client_id: int, like: State) -> State:
        return self._clients.get(client_id) or zeros_like_state(like)

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        check_same_layout("FedPepTAO", self._v, global_state)
        if len(updates) > self.num_clients:
            raise ValueError(f"FedPepTAO got {len(updates)} updates from {self.num_clients} clients")
        weights = example_weights(updates)
        theta = {n: t.detach().to("cpu", torch.float64) for n, t in global_state.items()}
        mean = weighted_sum(updates, weights, lambda u: u.state)
        corrected = dict(mean)
        if self.drift_correction:
            c = {n: t.double() for n, t in self._c.items()}
            change = {n: torch.zeros_like(t) for n, t in theta.items()}
            new_clients: dict[int, State] = {}
            for update, weight in zip(updates, weights, strict=True):
                # the pipeline may have clamped the count after validation: bound the steps by it too
                steps = min(int(update.metrics[STEPS]), self.bound(update.num_examples))
                scale = steps * self.local_lr
                own = {n: t.double() for n, t in self._client_control(update.client_id, global_state).items()}
                fresh = {}
                for n in theta:
                    corrected[n] = corrected[n] - weight * scale * (c[n] - own[n])
                    fresh[n] = (theta[n] - update.state[n].detach().to("cpu", torch.float64)) / scale
                    change[n] = change[n] + weight * (fresh[n] - own[n])
                new_clients[update.client_id] = {n: t.to(torch.float32) for n, t in fresh.items()}
            share = len(updates) / self.num_clients
            self._c = {n: (c[n] + share * change[n]).to(torch.float32) for n in theta}
            self._clients.update(new_clients)
        lr = self.current_server_lr()
        out: State = {}
        for n in theta:
            v = self.momentum * self._v[n].double() + (1 - self.momentum) * (theta[n] - corrected[n])
            self._v[n] = v.to(torch.float32)
            out[n] = (corrected[n] - lr * v).to(torch.float32)
        self._count += 1
        self.last_server_lr = lr
        return out

    def report(self) -> dict[str, Any]:
        """η_s of the last aggregation."""
        return {} if self.last_server_lr is None else {"fedpeptao_server_lr": self.last_server_lr}

    def state_dict(self) -> State:
        """v, c, each client's c_i (``ci/<client>/<tensor>``) and the aggregation count."""
        state = {**with_prefix(self._v, _MOMENTUM), **with_prefix(self._c, _CONTROL)}
        for cid, control in sorted(self._clients.items()):
            state.update(with_prefix(control, f"{_CLIENT}{cid}/"))
        state[_COUNT + "aggregations"] = torch.tensor([float(self._count)], dtype=torch.float32)
        return state

    def load_state_dict(self, state: State) -> None:
        """Restore v, c, the c_i and the count; an empty state resets them."""
        parts = load_with_prefix(state, [_MOMENTUM, _CONTROL, _CLIENT, _COUNT], "FedPepTAO")
        if not state:
            self._v = {n: torch.zeros_like(t) for n, t in self._v.items()}
            self._c = {n: torch.zeros_like(t) for n, t in self._c.items()}
            self._clients, self._count = {}, 0
            return
        v, c = parts[_MOMENTUM], parts[_CONTROL]
        if self._v:
            check_same_layout("FedPepTAO", v, self._v)
        clients: dict[int, State] = {}
        for key, tensor in parts[_CLIENT].items():
            cid, _, name = key.partition("/")
            if not cid.isdigit() or not name:
                raise ValueError(
                    f"FedPepTAO state key {_CLIENT + key!r} is not of the form ci/<client>/<tensor>"
                )
            clients.setdefault(int(cid), {})[name] = tensor
        count = parts[_COUNT].get("aggregations")
        if count is None or count.numel() != 1 or float(count) != int(count) or float(count) < 0:
            raise ValueError("FedPepTAO state needs its aggregation count t/aggregations")
        self._v, self._c, self._clients, self._count = v, c, clients, int(count)
