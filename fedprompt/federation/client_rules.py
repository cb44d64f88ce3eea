"""The client side of a strategy: where a client's round starts, what it adds to its local loss,
and what it sends up and carries forward.

A :class:`~fedprompt.federation.strategies.base.Strategy` is a pure server-side rule; a method that also
changes what clients do (FedProx's proximal term, SCAFFOLD's control variates, a personal prompt
pulled toward a shared one) pairs it with a :class:`ClientRule`. Rules work on the *wire* prompt
state (the part that is aggregated; see :mod:`fedprompt.federation.personalization`), on the extras the
strategy sent down, and on the client's *carried* state (:mod:`fedprompt.federation.client_state`), which
they read at the start of a round and return, changed, at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.state import State
from optimizers.base import OptimizationStats

Penalty = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""A term added to the local loss: maps the trainable wire tensors (differentiable) to a scalar."""


@dataclass(frozen=True)
class RoundInputs:
    """What a client's round starts from: the wire state the server sent down, the state the
    client carries from earlier rounds, the server's instructions (seed, extras, client config),
    and which client it is (None where a rule is exercised without one)."""

    downlink: State
    carried: State
    instructions: FitInstructions
    client_id: int | None = None


@dataclass
class RoundOutput:
    """What a rule makes of a finished local round: the wire state to send, extra tensors to send
    beside it, and the state the client carries forward (if the server uses this update)."""

    state: State
    extras: State = field(default_factory=dict)
    carried: State = field(default_factory=dict)


class ClientRule:
    """FedAvg's client side, the base of every rule: start from the global prompt, add nothing to
    the loss, send the trained prompt, carry nothing. Owns no state of its own: everything a rule
    keeps between rounds lives in the client's carried state, so it is checkpointed and resumed."""

    uses_validation = False
    """Whether the client reports ``val_accuracy`` of its trained prompt on its held-out split."""

    def start(self, inputs: RoundInputs) -> State:
        """The wire state the round trains from."""
        return inputs.downlink

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        """A term for the local loss, or None."""
        return None

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        """What to send and carry after local training ended at ``trained``."""
        return RoundOutput(trained, {}, {})


class ProximalRule(ClientRule):
    """FedProx's client side: adds (μ/2)·‖θ − θ_global‖² to the local loss, μ from the server's
    client config (``proximal_mu``), θ_global the wire state the round started from."""

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        mu = float(inputs.instructions.client_config.get("proximal_mu", 0.0))
        if mu <= 0:
            return None
        anchor = {name: t.detach().clone() for name, t in inputs.downlink.items()}

        def proximal(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return mu / 2 * sum(((params[n] - a.to(params[n].device)) ** 2).sum() for n, a in anchor.items())

        return proximal
