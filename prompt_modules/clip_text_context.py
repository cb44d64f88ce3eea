"""Text-side prompts of CLIP: CoOp's learned context (PromptFL) and fixed class templates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prompt_modules.clip_backbone import OpenCLIPBackbone, constant_tensors

PLACEHOLDER = "X"
ClassPosition = Literal["end", "middle", "front"]
CLASS_POSITIONS: tuple[ClassPosition, ...] = ("end", "middle", "front")


@dataclass(frozen=True)
class ClassTokens:
    """The class prompts of one class set, tokenised once, with ``M`` placeholder positions.

    ``ids`` [C, L] are the token ids, ``embeddings`` [C, L, d] their frozen token embeddings;
    ``positions`` [C, M] are, per class and in context order, the positions where the learned
    context vectors go (they differ between classes when the class name comes first or in the
    middle, since class names have different token counts).
    """

    names: tuple[str, ...]
    ids: torch.Tensor
    embeddings: torch.Tensor
    positions: torch.Tensor

    @property
    def num_context(self) -> int:
        return self.positions.shape[1]


def phrase_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` without start/end-of-text tokens or padding (a context phrase)."""
    ids = [int(i) for i in tokenizer([text])[0].tolist()]
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    first = 1 if ids and ids[0] in special else 0
    end = next((i for i in range(first, len(ids)) if ids[i] in special), None)
    if end is None:  # no end-of-text token: drop the zero padding at the end
        end = len(ids)
        while end > first and ids[end - 1] == 0:
            end -= 1
    return ids[first:end]


def _placeholders_before(num_context: int, position: ClassPosition) -> int:
    """How many of the context vectors come before the class name."""
    if position not in CLASS_POSITIONS:
        raise ValueError(f"unknown class position {position!r}; use one of {list(CLASS_POSITIONS)}")
    return {"end": num_context, "front": 0, "middle": num_context // 2}[position]


def class_layout(name: str, num_context: int, position: ClassPosition) -> str:
    """The class prompt text with ``num_context`` placeholders: CoOp's ``CLASS_TOKEN_POSITION``.

    end: ``X X X X name.``; front: ``name X X X X.``; middle: ``X X name X X.`` (the first
    ``num_context // 2`` placeholders before the name, the rest after it).
    """
    before = _placeholders_before(num_context, position)
    parts = [" ".join([PLACEHOLDER] * before), name, " ".join([PLACEHOLDER] * (num_context - before))]
    return " ".join(part for part in parts if part) + "."


def tokenize_classes(
    backbone: OpenCLIPBackbone, names: Sequence[str], num_context: int, position: ClassPosition = "end"
) -> ClassTokens:
    """Tokenise each class prompt (``class_layout``) and locate its ``num_context`` placeholders.

    The placeholders before the name start right after the start-of-text token; those after it
    start after the name's own tokens (counted by tokenising the name alone, as CoOp does).
    Raises ValueError when a class prompt does not fit the context length or the tokenizer does
    not give one token per placeholder at those positions.
    """
    if not names:
        raise ValueError("a class set needs at least one class name")
    with constant_tensors():  # kept for later training steps, even when first made in an evaluation
        return _tokenize_classes(backbone, names, num_context, position)


def _tokenize_classes(
    backbone: OpenCLIPBackbone, names: Sequence[str], num_context: int, position: ClassPosition
) -> ClassTokens:
    ids = backbone.tokenize([class_layout(name, num_context, position) for name in names])
    empty, only_placeholder = backbone.tokenize(["", PLACEHOLDER])
    differs = (empty != only_placeholder).nonzero()
    start = int(differs[0]) if len(differs) else 0
    before = _placeholders_before(num_context, position)
    after = torch.arange(num_context - before)
    if position == "end":
        name_lengths = torch.zeros(len(names), dtype=torch.long)
    else:
        alone = backbone.tokenize(list(names))
        name_lengths = (backbone.pooled_positions(alone) - start).cpu()
    positions = torch.cat(
        [
            (start + torch.arange(before)).expand(len(names), -1),
            start + before + name_lengths[:, None] + after[None, :],
        ],
        dim=1,
    ).to(ids.device)
    ends = backbone.pooled_positions(ids)
    too_long = [names[i] for i in range(len(names)) if int(ends[i]) >= ids.shape[1] - 1 and ids[i, -1] != 0]
    if too_long:
        raise ValueError(
            f"class prompts of {too_long[:3]} do not fit the text tower's {ids.shape[1]} tokens with "
            f"{num_context} context tokens; shorten the class names or use fewer context tokens"
        )
    placeholder = only_placeholder[start]
    if num_context and not bool((ids.gather(1, positions) == placeholder).all()):
        raise ValueError(
            f"the tokenizer of {backbone.name!r} does not give one token per context placeholder "
            f"with the class name at the {position}"
        )
    return ClassTokens(tuple(names), ids, backbone.token_embeddings(ids), positions)


def repeat_tokens(tokens: ClassTokens, times: int) -> ClassTokens:
    """``tokens`` of C classes repeated ``times`` times over (C·times prompts, class order within each
    repeat): for text passes that score one class set under several contexts at once."""
    return ClassTokens(
        tokens.names * times,
        tokens.ids.repeat(times, 1),
        tokens.embeddings.repeat(times, 1, 1),
        tokens.positions.repeat(times, 1),
    )


def _place(hidden: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``hidden`` [C, L, d] with ``rows`` ([M, d] shared or [C, M, d]) written at ``positions`` [C, M]."""
    rows = rows.to(hidden.dtype)
    rows = rows.expand(hidden.shape[0], -1, -1) if rows.dim() == 2 else rows
    index = positions[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.scatter(1, index, rows)


def context_class_features(
    backbone: OpenCLIPBackbone,
    tokens: ClassTokens,
    context: torch.Tensor,
    deep: torch.Tensor | None = None,
    full_length: bool = False,
) -> torch.Tensor:
    """Text features [C, D] of the class prompts with ``context`` in the placeholder positions.

    ``context``: [M, d] shared by the classes or [C, M, d] one per class. ``deep``: [J-1, M, d],
    the prompts that overwrite those positions at the input of text layers 1..J-1 (MaPLe-style
    deep text prompts); the previous layer's outputs there are discarded.
    """
    m = tokens.num_context
    if context.shape[-2] != m:
        raise ValueError(f"{context.shape[-2]} context vectors for class prompts with {m} placeholders")
    x = _place(tokens.embeddings, tokens.positions, context)

    def overwrite(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if deep is None or not 1 <= layer <= deep.shape[0]:
            return hidden
        return _place(hidden, tokens.positions.to(hidden.device), deep[layer - 1])

    return backbone.text_features(x, tokens.ids, overwrite if deep is not None else None, full_length)


class TextContext(nn.Module):
    """Owns CoOp's learned context (the prompt of PromptFL): M vectors around the class-name tokens.

    ``context`` is [M, d] (shared by all classes) or [C, M, d] (class-specific, for the classes
    ``class_names`` only). ``deep`` ([J-1, M, d], optional) holds shared prompts for text layers
    1..J-1 as MaPLe uses them; CoOp and PromptFL have none (depth 1). ``class_position`` is
    where the class name sits (CoOp's ``CLASS_TOKEN_POSITION``): after the context (``end``, CoOp's
    default), before it (``front``) or between its two halves (``middle``).
    """

    def __init__(
        self,
        context: torch.Tensor,
        deep: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        class_position: ClassPosition = "end",
    ) -> None:
        super().__init__()
        if context.dim() not in (2, 3):
            raise ValueError(f"context is [M, d] or [C, M, d]; got shape {tuple(context.shape)}")
        if context.dim() == 3 and (class_names is None or len(class_names) != context.shape[0]):
            raise ValueError("class-specific context [C, M, d] needs the C class names it belongs to")
        if deep is not None and (deep.dim() != 3 or deep.shape[1:] != context.shape[-2:]):
            raise ValueError(
                f"deep text prompts are [J-1, M, d] with M, d of the context; got {tuple(deep.shape)}"
            )
        self.context = nn.Parameter(context.clone())
        self.deep = nn.Parameter(deep.clone()) if deep is not None and deep.shape[0] else None
        if class_position not in CLASS_POSITIONS:
            raise ValueError(f"unknown class position {class_position!r}; use one of {list(CLASS_POSITIONS)}")
        self.class_names = tuple(class_names) if context.dim() == 3 and class_names is not None else None
        self.class_position = class_position
        self._tokens: dict[tuple, ClassTokens] = {}

    @property
    def num_tokens(self) -> int:
        return self.context.shape[-2]

    @property
    def depth(self) -> int:
        """Number of text layers that get a prompt (1: the input only)."""
        return 1 + (self.deep.shape[0] if self.deep is not None else 0)

    def layer_prompts(self) -> list[torch.Tensor]:
        """The shared prompt [M, d] of each prompted text layer 0..depth-1 (for coupled visual prompts)."""
        if self.context.dim() == 3:
            raise ValueError(
                "class-specific context has no single prompt per layer to couple a visual prompt to"
            )
        return [self.context, *(self.deep.unbind(0) if self.deep is not None else [])]

    def class_features(
        self, backbone: OpenCLIPBackbone, names: Sequence[str], full_length: bool = False
    ) -> torch.Tensor:
        """Text features [C, D] of the classes ``names`` under the current context."""
        if self.class_names is not None and tuple(names) != self.class_names:
            raise ValueError(
                f"class-specific context was learned for {len(self.class_names)} classes "
                f"{list(self.class_names)[:5]}…; it cannot score other classes (use shared context)"
            )
        return context_class_features(
            backbone, self.tokens_for(backbone, names), self.context, self.deep, full_length
        )

    def tokens_for(self, backbone: OpenCLIPBackbone, names: Sequence[str]) -> ClassTokens:
        """The class prompts of ``names`` tokenised for this context (once per class set and device)."""
        key = (tuple(names), str(backbone.device))
        if key not in self._tokens:
            self._tokens[key] = tokenize_classes(backbone, names, self.num_tokens, self.class_position)
        return self._tokens[key]


class FixedClassText(nn.Module):
    """Owns nothing trainable: the text features of ``template`` filled with each class name.

    The image-side-only prompts (VPT, pixel prompts) score against these; they are computed once
    per class set and reused.
    """

    def __init__(self, template: str = "a photo of a {}.") -> None:
        super().__init__()
        if template.count("{}") != 1:
            raise ValueError(f"a class template needs '{{}}' exactly once, got {template!r}")
        self.template = template
        self._features: dict[tuple, torch.Tensor] = {}

    def class_features(
        self, backbone: OpenCLIPBackbone, names: Sequence[str], full_length: bool = False
    ) -> torch.Tensor:
        key = (tuple(names), str(backbone.device))
        if key not in self._features:
            self._features[key] = backbone.encode_text([self.template.format(n) for n in names])
        return self._features[key]
