"""Examples held as aligned tensors, tokenised once, and the batches cut from them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TensorData:
    """Owns a set of examples as aligned tensors with a leading example dimension.

    Text data holds right-padded ``input_ids`` and ``attention_mask`` plus ``labels`` (and, for deep
    prompts from layer k > 0, the cached states entering layer k, [N, L, h]); each batch is trimmed
    to its longest row, so short batches cost less.
    """

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"tensors disagree on the number of examples: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    def subset(self, indices: Sequence[int] | np.ndarray) -> TensorData:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorData({name: t[index] for name, t in self.tensors.items()})

    def concat(self, other: TensorData) -> TensorData:
        """These examples followed by ``other``'s (the same tensors, of the same trailing shapes)."""
        if set(self.tensors) != set(other.tensors):
            raise ValueError(
                f"cannot join examples of tensors {sorted(self.tensors)} and {sorted(other.tensors)}"
            )
        for name, t in self.tensors.items():
            if t.shape[1:] != other.tensors[name].shape[1:]:
                raise ValueError(
                    f"cannot join {name!r} of shapes {tuple(t.shape)} and {tuple(other.tensors[name].shape)}"
                )
        return TensorData({name: torch.cat([t, other.tensors[name]]) for name, t in self.tensors.items()})

    def batches(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order, or shuffled by ``generator``; the last one may be smaller."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            batch = {name: t[index] for name, t in self.tensors.items()}
            if "attention_mask" in batch:
                width = int(batch["attention_mask"].sum(1).max())
                for name, t in batch.items():
                    if t.dim() >= 2 and t.shape[1] == self.tensors["attention_mask"].shape[1]:
                        batch[name] = t[:, :width]
            yield {name: t.to(device, non_blocking=True) for name, t in batch.items()}
