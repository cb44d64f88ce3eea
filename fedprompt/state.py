"""The values that move through a round: prompt state and client updates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]
"""A prompt state: tensor name -> tensor. Only trainable prompt state, never backbone weights."""


@dataclass
class Update:
    """One client's contribution to a round: its new prompt state and the data behind it."""

    client_id: int
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def clone_state(state: State) -> State:
    """A detached fp32 CPU copy of a state (what the server keeps and aggregates)."""
    return {name: t.detach().to("cpu", torch.float32).clone() for name, t in state.items()}


def state_bytes(state: State) -> int:
    """Bytes the tensors of a state occupy in their own dtypes."""
    return sum(t.numel() * t.element_size() for t in state.values())
