"""The values that move through a round: prompt state and client updates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]
"""A prompt state: tensor name -> tensor. Only trainable prompt state, never backbone weights."""

EXTRA_PREFIX = "extra/"
"""Wire-name prefix of the extra tensors a strategy exchanges beside the prompt state."""


@dataclass
class Update:
    """One client's contribution to a round: its new prompt state and the data behind it.

    ``extras`` holds what the strategy asked for beyond the prompt state (e.g. FedBPT's CMA-ES
    solutions and losses); plain averaging strategies ask for none.
    """

    client_id: int
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: State = field(default_factory=dict)


def clone_state(state: State) -> State:
    """A detached fp32 CPU copy of a state (what the server keeps and aggregates)."""
    return {name: t.detach().to("cpu", torch.float32).clone() for name, t in state.items()}


def pack(state: State, extras: State) -> State:
    """One flat tensor mapping for the wire: the state's names, then ``extra/<name>`` for extras."""
    return {**state, **{EXTRA_PREFIX + name: t for name, t in extras.items()}}


def unpack(tensors: State) -> tuple[State, State]:
    """Split what ``pack`` joined back into (state, extras)."""
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    extras = {k.removeprefix(EXTRA_PREFIX): v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    return state, extras
