"""Soft prompts for text models: input prompt tuning and deep (per-layer) prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

PromptInit = Literal["text", "vocab", "random"]


@dataclass
class TextPrompt:
    """The prompt vectors of one forward pass.

    ``input``: [m, h] shared by the batch, or [B, m, h] one per row (a population of candidates
    evaluated together). ``layers``: [n, m, h], the prompts of layers ``start_layer`` to
    ``start_layer + n - 1``; each replaces the prompt positions of its layer's input.
    """

    input: torch.Tensor | None = None
    layers: torch.Tensor | None = None
    start_layer: int = 0

    @property
    def num_tokens(self) -> int:
        source = self.input if self.input is not None else self.layers
        if source is None:
            raise ValueError("a TextPrompt needs an input prompt, layer prompts, or both")
        return source.shape[-2]


def init_prompt_embeddings(
    embedding_matrix: torch.Tensor,
    num_tokens: int,
    init: PromptInit,
    *,
    generator: torch.Generator,
    text_ids: Sequence[int] = (),
    excluded_ids: Sequence[int] = (),
    std: float = 0.02,
) -> torch.Tensor:
    """Starting prompt vectors [num_tokens, h] (fp32, on the CPU).

    - ``text``: the embeddings of ``text_ids`` (a phrase), repeated cyclically or cut to length;
    - ``vocab``: the embeddings of tokens drawn uniformly from the vocabulary, special tokens
      (``excluded_ids``) excepted (Lester et al. 2021);
    - ``random``: N(0, std²) entries.
    """
    weights = embedding_matrix.detach().float().cpu()
    if init == "random":
        return torch.randn(num_tokens, weights.shape[1], generator=generator) * std
    if init == "text":
        if not text_ids:
            raise ValueError("init 'text' needs the token ids of a non-empty phrase")
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(num_tokens)])
    elif init == "vocab":
        allowed = torch.ones(weights.shape[0], dtype=torch.bool)
        allowed[list(excluded_ids)] = False
        candidates = allowed.nonzero().squeeze(1)
        ids = candidates[torch.randint(len(candidates), (num_tokens,), generator=generator)]
    else:
        raise ValueError(f"unknown prompt init {init!r}; use 'text', 'vocab' or 'random'")
    return weights[ids].clone()


class SoftPrompt(nn.Module):
    """Owns ``num_tokens`` trainable virtual-token embeddings placed in the input sequence."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        if init.dim() != 2:
            raise ValueError(f"a soft prompt is [num_tokens, hidden]; got shape {tuple(init.shape)}")
        self.embeddings = nn.Parameter(init.clone())

    def forward(self) -> TextPrompt:
        return TextPrompt(input=self.embeddings)


class DeepPrompt(nn.Module):
    """Owns one trainable prompt per layer from ``start_layer`` up (P-tuning v2 / VPT-deep style).

    At the input of each prompted layer, the prompt positions are overwritten with that layer's
    prompt, so the previous layer's outputs at those positions are discarded. Below
    ``start_layer`` the prompt positions hold a fixed zero embedding: those layers see nothing
    trainable, and their outputs do not depend on the prompt state.
    """

    def __init__(self, init: torch.Tensor, start_layer: int) -> None:
        super().__init__()
        if init.dim() != 3:
            raise ValueError(f"a deep prompt is [layers, num_tokens, hidden]; got shape {tuple(init.shape)}")
        self.start_layer = start_layer
        self.layers = nn.Parameter(init.clone())

    def forward(self) -> TextPrompt:
        return TextPrompt(layers=self.layers, start_layer=self.start_layer)
