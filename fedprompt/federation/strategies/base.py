"""The Strategy interface: a pure server-side aggregation rule over client updates."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from fedprompt.federation.state import State, Update


class Strategy(ABC):
    """A server-side rule that turns the global state and the round's updates into the next state.

    A strategy owns only its own server-side state (e.g. FedAdam's moments), exposed through
    ``state_dict``/``load_state_dict`` so a run can checkpoint and resume. It never sees bytes,
    clients or models: only fp32 tensors that were validated on arrival.
    """

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        """Validate the inputs, order the updates by client id, and apply the rule.

        Each update must come from a distinct client, carry exactly the tensors of
        ``uplink_shapes`` (by default the global state's names and shapes) and the uplink extras,
        and have ``num_examples > 0``; otherwise ``ValueError``.
        """
        if not updates:
            raise ValueError("aggregate needs at least one update")
        shapes = self.uplink_shapes(global_state)
        seen: set[int] = set()
        for update in updates:
            if update.client_id in seen:
                raise ValueError(f"client {update.client_id} sent more than one update this round")
            seen.add(update.client_id)
            if set(update.state) != set(shapes):
                raise ValueError(
                    f"update from client {update.client_id} has tensors {sorted(update.state)}, "
                    f"expected {sorted(shapes)}"
                )
            for name, tensor in update.state.items():
                if tuple(tensor.shape) != tuple(shapes[name]):
                    raise ValueError(
                        f"update from client {update.client_id} has {name!r} of shape {tuple(tensor.shape)}, "
                        f"expected {tuple(shapes[name])}"
                    )
            want = self.uplink_extras()
            got = {name: tuple(t.shape) for name, t in update.extras.items()}
            if got != {name: tuple(shape) for name, shape in want.items()}:
                raise ValueError(
                    f"update from client {update.client_id} has extra tensors {got}, expected {dict(want)}"
                )
            if update.num_examples <= 0:
                raise ValueError(
                    f"update from client {update.client_id} has num_examples={update.num_examples}, "
                    "expected a positive count"
                )
        ordered = sorted(updates, key=lambda u: u.client_id)
        return self._aggregate(global_state, ordered)

    @abstractmethod
    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        """The rule itself; ``updates`` are sorted by client id and share the global state's names."""

    def initialize(self, global_state: State) -> None:
        """Learn the prompt state's names and shapes before the first round (the server calls it
        when it is made): a strategy whose extras have the prompt's shape (SCAFFOLD's control
        variates) or whose server state starts at zero in that shape makes it here. State it
        already holds (e.g. loaded from a checkpoint) stays; nothing by default."""
        return None

    def uplink_shapes(self, global_state: State) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the prompt tensors every update carries: the global state's by
        default (a rule whose clients send something else, e.g. seeds and scalars, overrides it)."""
        return {name: tuple(t.shape) for name, t in global_state.items()}

    def downlink_shapes(self, global_state: State) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the prompt tensors every downlink carries (what ``downlink_state``
        returns): the global state's by default (a rule that sends something else, e.g. FedKSeed's
        seed pool, overrides it)."""
        return {name: tuple(t.shape) for name, t in global_state.items()}

    def downlink_state(self, client_id: int, global_state: State) -> State:
        """The prompt state sent to ``client_id``: the global state by default (a personalised rule
        may send each client its own)."""
        return global_state

    def client_config(self) -> dict[str, float]:
        """Values the clients need for their local objective (FedProx's mu); none by default."""
        return {}

    def validate_update(self, update: Update) -> None:
        """Raise ValueError naming what is wrong with one decoded client update that this rule
        cannot use (the server then rejects it and the round goes on); accepts all by default."""
        return None

    def downlink_extras(self) -> State:
        """Tensors sent down with the global state (e.g. FedBPT's CMA-ES step size); none by default."""
        return {}

    def uplink_extras(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the extra tensors every client update must carry; none by default."""
        return {}

    def report(self) -> dict[str, Any]:
        """What the last aggregation wants in the round's metrics (e.g. client weights); none by default."""
        return {}

    def state_dict(self) -> State:
        """Server-side state to checkpoint; none by default."""
        return {}

    def load_state_dict(self, state: State) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state, got {sorted(state)}")
