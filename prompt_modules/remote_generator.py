"""Fed-BBPT through a remote backbone: the client's prompt generator writes z, the service (which
never sees the generator) scores the z it is sent. A new module beside ``remote``, so the remote
backbone itself stays as it is."""

from __future__ import annotations

from typing import Any

import torch

from prompt_modules.base import Batch
from prompt_modules.heads import SimilarityHeadSpec, VerbalizerHeadSpec
from prompt_modules.intrinsic import ProjectionSpec
from prompt_modules.intrinsic_generator import ZGenerator
from prompt_modules.remote import RemoteBackbone, RemoteIntrinsicClassifier


class RemoteGeneratedClassifier(RemoteIntrinsicClassifier):
    """A ``RemoteIntrinsicClassifier`` whose z a client-side ``ZGenerator`` writes: owns the generator
    (its weights are the state, ``prompt.weights``); candidates are weight vectors, each mapped to its
    z on the client before the service scores the population of z in one call."""

    def __init__(
        self,
        backbone: RemoteBackbone,
        tokenizer: Any,
        template: str,
        head: SimilarityHeadSpec | VerbalizerHeadSpec,
        projection: ProjectionSpec,
        generator: ZGenerator,
    ) -> None:
        super().__init__(backbone, tokenizer, template, head, projection)
        if generator.dim != projection.dim:
            raise ValueError(
                f"the generator writes z of {generator.dim}, the projection takes {projection.dim}"
            )
        self.prompt = generator

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.population_logits(self.prompt.weights.detach()[None], batch)[0]

    def population_logits(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class logits [P, B, C] under each candidate weight vector [P, n], from the service."""
        with torch.no_grad():
            return super().population_logits(self.prompt.z_of(candidates), batch)

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate weight vector on the batch, from the service."""
        with torch.no_grad():
            return super().population_losses(self.prompt.z_of(candidates), batch)
