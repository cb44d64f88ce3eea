"""Soft prompts for text models: input prompt tuning and deep (per-layer) prompts, the latter as
key/value prefixes in each layer's attention (P-tuning v2) or as hidden states that replace the
prompt positions at each layer's input (VPT-deep style)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import nn

PromptInit = Literal["text", "vocab", "random"]


@dataclass
class TextPrompt:
    """The prompt vectors of one forward pass; exactly one of the three is set.

    ``input``: [m, h] shared by the batch, or [B, m, h] one per row (a population of candidates
    evaluated together), placed in the input sequence. ``layers``: [n, m, h], the prompts of layers
    ``start_layer`` to ``start_layer + n - 1``; the m prompt positions enter the sequence at
    ``start_layer`` and each layer's prompt replaces them at its input. ``prefix``:
    [n, 2, kv_heads, m, head_dim], the keys and values that the attention of layers
    ``start_layer``.. attends before the sequence (the sequence itself does not grow).
    ``layer_ids``, when given, are the n layers a deep prompt's rows belong to instead (ascending,
    not necessarily contiguous; ``start_layer`` is then the first of them).
    """

    input: torch.Tensor | None = None
    layers: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    start_layer: int = 0
    layer_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = sum(t is not None for t in (self.input, self.layers, self.prefix))
        if given != 1:
            raise ValueError(f"a TextPrompt holds one of input, layers or prefix; got {given}")
        if self.input is not None and (self.start_layer != 0 or self.layer_ids is not None):
            raise ValueError("an input prompt enters at layer 0; start_layer applies to deep prompts")
        if self.layer_ids is not None:
            deep = self.layers if self.layers is not None else self.prefix
            check_layer_ids(self.layer_ids, deep.shape[0])
            if self.start_layer != self.layer_ids[0]:
                raise ValueError(
                    f"start_layer {self.start_layer} is not the first of layer_ids {self.layer_ids}"
                )

    @property
    def deep_layers(self) -> tuple[int, ...]:
        """The layer of each row of a deep prompt (empty for an input prompt)."""
        if self.input is not None:
            return ()
        if self.layer_ids is not None:
            return self.layer_ids
        deep = self.layers if self.layers is not None else self.prefix
        return tuple(range(self.start_layer, self.start_layer + deep.shape[0]))

    @property
    def num_tokens(self) -> int:
        """m, the virtual tokens (positions in the sequence, or prefix slots in attention)."""
        source = (
            self.prefix if self.prefix is not None else self.input if self.input is not None else self.layers
        )
        return source.shape[-2]

    @property
    def inserted_tokens(self) -> int:
        """Positions the prompt adds to the sequence: m, or 0 for a key/value prefix."""
        return 0 if self.prefix is not None else self.num_tokens


def check_layer_ids(layer_ids: Sequence[int], rows: int) -> None:
    """ValueError unless ``layer_ids`` are ``rows`` distinct, ascending, non-negative layer indices."""
    ids = list(layer_ids)
    if len(ids) != rows:
        raise ValueError(f"{len(ids)} layer ids for a deep prompt of {rows} layers")
    if not ids or ids[0] < 0 or any(b <= a for a, b in pairwise(ids)):
        raise ValueError(f"layer ids must be distinct, ascending and non-negative; got {ids}")


def init_token_ids(
    vocab_size: int,
    num_tokens: int,
    init: Literal["text", "vocab"],
    *,
    generator: torch.Generator,
    text_ids: Sequence[int] = (),
    excluded_ids: Sequence[int] = (),
) -> torch.Tensor:
    """The token ids [num_tokens] a prompt starts from: the phrase ``text_ids`` repeated cyclically or
    cut to length (``text``), or tokens drawn uniformly from the vocabulary without ``excluded_ids``
    (``vocab``, Lester et al. 2021)."""
    if init == "text":
        if not text_ids:
            raise ValueError("init 'text' needs the token ids of a non-empty phrase")
        return torch.tensor([text_ids[i % len(text_ids)] for i in range(num_tokens)])
    if init != "vocab":
        raise ValueError(f"unknown prompt init {init!r}; use 'text', 'vocab' or 'random'")
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(excluded_ids)] = False
    candidates = allowed.nonzero().squeeze(1)
    return candidates[torch.randint(len(candidates), (num_tokens,), generator=generator)]


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
    ids = init_token_ids(
        weights.shape[0], num_tokens, init, generator=generator, text_ids=text_ids, excluded_ids=excluded_ids
    )
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


def _layer_ids(layer_ids: Sequence[int] | None, start_layer: int, rows: int) -> tuple[int, ...] | None:
    """Checked explicit layer ids (None: the contiguous layers from ``start_layer``)."""
    if layer_ids is None:
        return None
    check_layer_ids(layer_ids, rows)
    if start_layer != layer_ids[0]:
        raise ValueError(f"start_layer {start_layer} is not the first of layer_ids {list(layer_ids)}")
    return tuple(int(i) for i in layer_ids)


class LayeredPrompt(nn.Module):
    """The part every deep prompt shares: one row of its trainable tensor per prompted layer, the
    layers the rows belong to, and ``held_layers``, how many of the lowest rows a forward pass holds
    at their values (cut from the autograd graph: no gradient reaches them, and since nothing below
    them trains, the backward pass stops at the lowest trained layer). FeS's co-planner sets it per
    round to train only the top layers; 0, the default, trains every row."""

    start_layer: int
    layer_ids: tuple[int, ...] | None

    def __init__(self) -> None:
        super().__init__()
        self.held_layers = 0

    @property
    def layer_parameter(self) -> nn.Parameter:
        """The trainable tensor, one row per prompted layer."""
        raise NotImplementedError

    @property
    def prompted_layers(self) -> tuple[int, ...]:
        """The model layers the rows belong to, ascending."""
        rows = self.layer_parameter.shape[0]
        return self.layer_ids or tuple(range(self.start_layer, self.start_layer + rows))

    def _rows(self) -> torch.Tensor:
        """The trainable tensor with its ``held_layers`` lowest rows detached (the same values)."""
        tensor, held = self.layer_parameter, self.held_layers
        if not 0 <= held < tensor.shape[0]:
            raise ValueError(
                f"held_layers is {held}; a prompt of {tensor.shape[0]} layers trains at least one"
            )
        return tensor if held == 0 else torch.cat([tensor[:held].detach(), tensor[held:]])


class DeepPrompt(LayeredPrompt):
    """Owns one trainable prompt per prompted layer, as replaced hidden states (deep mode
    ``replace``, VPT-deep style): the layers from ``start_layer`` up, or the ``layer_ids`` given.

    The m prompt positions enter the sequence at ``start_layer``; at the input of each prompted
    layer they are overwritten with that layer's prompt, so the previous layer's outputs there are
    discarded (a layer without a prompt of its own carries them on). Layers below ``start_layer``
    compute the unprompted model.
    """

    def __init__(self, init: torch.Tensor, start_layer: int, layer_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        if init.dim() != 3:
            raise ValueError(f"a deep prompt is [layers, num_tokens, hidden]; got shape {tuple(init.shape)}")
        self.start_layer = start_layer
        self.layer_ids = _layer_ids(layer_ids, start_layer, init.shape[0])
        self.layers = nn.Parameter(init.clone())

    @property
    def layer_parameter(self) -> nn.Parameter:
        return self.layers

    def forward(self) -> TextPrompt:
        return TextPrompt(layers=self._rows(), start_layer=self.start_layer, layer_ids=self.layer_ids)


class PrefixPrompt(LayeredPrompt):
    """Owns trainable key/value prefixes for each prompted layer (deep mode ``prefix``, P-tuning
    v2): ``prefix`` [n, 2, kv_heads, m, head_dim] holds the keys (index 0) and values (index 1)
    that layer ``start_layer + i``'s attention (or ``layer_ids[i]``'s: any set of layers, as
    FedPepTAO selects them) attends before the sequence.

    The input sequence is unchanged: every layer computes the unprompted model except through
    attention to its prefix, and layers below ``start_layer`` compute the unprompted model.
    ``dropout`` is P-tuning v2's dropout on the prefixes, active in training mode only.
    """

    def __init__(
        self,
        init: torch.Tensor,
        start_layer: int,
        layer_ids: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if init.dim() != 5 or init.shape[1] != 2:
            raise ValueError(
                "a prefix prompt is [layers, 2, kv_heads, num_tokens, head_dim]; "
                f"got shape {tuple(init.shape)}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"prefix dropout must be in [0, 1), got {dropout}")
        self.start_layer = start_layer
        self.layer_ids = _layer_ids(layer_ids, start_layer, init.shape[0])
        self.prefix = nn.Parameter(init.clone())
        self.dropout = nn.Dropout(dropout)

    @property
    def layer_parameter(self) -> nn.Parameter:
        return self.prefix

    def forward(self) -> TextPrompt:
        return TextPrompt(
            prefix=self.dropout(self._rows()), start_layer=self.start_layer, layer_ids=self.layer_ids
        )
