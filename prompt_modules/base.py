"""The PromptModule interface: trainable prompt state plus logits through a frozen backbone."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

Batch = Mapping[str, torch.Tensor]


class PromptModule(nn.Module, ABC):
    """Owns the trainable prompt state and computes class logits for a batch through a backbone.

    The backbone is held by reference outside the module tree: ``state_dict()`` holds the prompt
    state alone, ``.to()`` moves only the prompt, and one backbone serves every module and client.
    Constant tensors derived from the backbone (class-name embeddings, label-word ids) are
    non-persistent buffers, so they never travel either.
    """

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)

    @property
    def backbone(self) -> Any:
        return self._backbone

    @abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Class logits [B, C] for a batch."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """The number of classes the logits score."""

    def prompt_tensor_names(self) -> list[str]:
        """The names of the state's prompt tensors (context vectors, visual tokens, pixel prompts), as
        opposed to networks trained beside them (a fusion head, an adaptive network): what rules
        that compare prompts read. All of the state unless a module says otherwise."""
        return list(self.state_dict())

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the trainable prompt state (what a client sends)."""
        return {name: t.detach().clone() for name, t in self.state_dict().items()}


@runtime_checkable
class PopulationModule(Protocol):
    """A prompt module whose trainable state is one vector and that scores many candidate vectors
    in one call (what black-box optimisers need). Local and remote backbones implement it alike."""

    def population_logits(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class logits [P, B, C] of a batch under each candidate vector of ``candidates`` [P, d]."""
        ...

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate on the batch (its ``labels``)."""
        ...


def population_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per candidate [P] from logits [P, B, C] and labels [B]."""
    count, rows, classes = logits.shape
    per_row = F.cross_entropy(
        logits.float().reshape(count * rows, classes), labels.repeat(count), reduction="none"
    )
    return per_row.reshape(count, rows).mean(1)
