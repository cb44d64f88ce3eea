"""The PromptModule interface: trainable prompt state plus logits through a frozen backbone."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
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

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the trainable prompt state (what a client sends)."""
        return {name: t.detach().clone() for name, t in self.state_dict().items()}
