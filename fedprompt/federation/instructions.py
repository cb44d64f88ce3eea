"""What the server tells a client for a round; importable without torch (the Flower relay path)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedprompt.federation.state import State


@dataclass(frozen=True)
class FitInstructions:
    """What the server tells a client for one round: the round, the client's seed, strategy values,
    the extra tensors the strategy sent down with the global state (e.g. a CMA-ES step size), and
    the last round whose update of this client the server used (``accepted_round``, 0 for none:
    the client's carried state is the one it staged in that round)."""

    round: int
    seed: int
    client_config: Mapping[str, float] = field(default_factory=dict)
    extras: State = field(default_factory=dict)
    accepted_round: int = 0
