"""Fed-BBPT's prompt generator for a black-box text model (Lin et al. 2023, "Efficient Federated
Prompt Tuning for Black-box Large Pre-trained Models"): a small network, held and trained by each
client, that writes the prompt the black box is queried with; only its weights are aggregated.

Here the generator writes an intrinsic prompt's z, which the model's side turns into prompt
vectors A z + p0 (Black-Box Tuning's projection, rebuilt by every party from a seed):

    z = W₂ · tanh(W₁ c + b₁) + b₂,

with c a fixed code (from a seed, never trained or sent). All the weights are one flat vector, the
module's whole state, so zeroth-order optimisers (SPSA) perturb it as one vector and a population
of weight vectors maps to a population of z that one call scores; gradient training works too
(the same generator on a local backbone, the baseline Fed-BBPT is compared with). W₂ and b₂ start
at zero, so the first prompt is p0 (z = 0, as Black-Box Tuning starts).
"""

from __future__ import annotations

import torch
from torch import nn

from prompt_modules.intrinsic import IntrinsicPrompt
from prompt_modules.soft_prompt import TextPrompt


class ZGenerator(nn.Module):
    """Owns the generator's weights (one vector ``weights``: W₁ [hidden, code], b₁ [hidden],
    W₂ [dim, hidden], b₂ [dim]) and, as a non-persistent buffer, its fixed code c."""

    def __init__(self, dim: int, code_dim: int, hidden: int, seed: int) -> None:
        super().__init__()
        if min(dim, code_dim, hidden) < 1:
            raise ValueError(
                f"a generator needs positive sizes, got dim {dim}, code {code_dim}, hidden {hidden}"
            )
        self.dim, self.code_dim, self.hidden = dim, code_dim, hidden
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("code", torch.randn(code_dim, generator=generator), persistent=False)
        first = torch.randn(hidden, code_dim, generator=generator) / code_dim**0.5
        weights = torch.zeros(self.num_weights)
        weights[: hidden * code_dim] = first.reshape(-1)
        self.weights = nn.Parameter(weights)

    @property
    def num_weights(self) -> int:
        return self.hidden * self.code_dim + self.hidden + self.dim * self.hidden + self.dim

    def z_of(self, weights: torch.Tensor) -> torch.Tensor:
        """z [..., dim] written by weight vectors [..., num_weights] (differentiable)."""
        if weights.shape[-1] != self.num_weights:
            raise ValueError(f"weights have {weights.shape[-1]} entries, this generator {self.num_weights}")
        h, c, d = self.hidden, self.code_dim, self.dim
        lead = weights.shape[:-1]
        w1 = weights[..., : h * c].reshape(*lead, h, c)
        b1 = weights[..., h * c : h * c + h]
        w2 = weights[..., h * c + h : h * c + h + d * h].reshape(*lead, d, h)
        b2 = weights[..., h * c + h + d * h :]
        code = self.code.to(weights)
        hidden = torch.tanh((w1 @ code) + b1)
        return (w2 @ hidden.unsqueeze(-1)).squeeze(-1) + b2

    @property
    def z(self) -> torch.Tensor:
        """The z the current weights write."""
        return self.z_of(self.weights)


class GeneratedIntrinsicPrompt(ZGenerator):
    """A ``ZGenerator`` whose z becomes prompt vectors through the fixed projection of an
    ``IntrinsicPrompt`` (non-persistent buffers A and p0), on a local backbone: the state is the
    generator's weights (``weights``), as on a remote one. Candidates scored together are weight
    vectors (``z_of`` turns them into z)."""

    def __init__(self, projection: IntrinsicPrompt, code_dim: int, hidden: int, seed: int) -> None:
        super().__init__(projection.dim, code_dim, hidden, seed)
        self.register_buffer("projection", projection.projection, persistent=False)
        self.register_buffer("offset", projection.offset, persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.offset.shape[0]

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Prompt vectors [..., m, h] of vectors z [..., d] (A z + p0)."""
        flat = z.to(self.projection) @ self.projection.T
        return flat.reshape(*z.shape[:-1], *self.offset.shape) + self.offset

    def forward(self) -> TextPrompt:
        return TextPrompt(input=self.project(self.z))
