"""Text-side prompts of CLIP: CoOp's learned context (PromptFL) and fixed class templates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prompt_modules.clip_backbone import OpenCLIPBackbone, constant_tensors

PLACEHOLDER = "X"


@dataclass(frozen=True)
class ClassTokens:
    """The class prompts of one class set, tokenised once: ``[SOS] X … X <name> . [EOS]``.

    ``ids`` [C, L] are the token ids, ``embeddings`` [C, L, d] their frozen token embeddings; the
    ``num_context`` placeholder positions from ``start`` are where learned context goes.
    """

    names: tuple[str, ...]
    ids: torch.Tensor
    embeddings: torch.Tensor
    start: int
    num_context: int


def tokenize_classes(backbone: OpenCLIPBackbone, names: Sequence[str], num_context: int) -> ClassTokens:
    """Tokenise ``"X X … X <name>."`` for each class (CoOp's layout, class name at the end).

    Raises ValueError when a class prompt does not fit the context length or the tokenizer does
    not give one token per placeholder.
    """
    if not names:
        raise ValueError("a class set needs at least one class name")
    placeholder = " ".join([PLACEHOLDER] * num_context)
    ids = backbone.tokenize([f"{placeholder} {name}.".strip() for name in names])
    empty, only_placeholder = backbone.tokenize(["", placeholder])
    differs = (empty != only_placeholder).nonzero()
    start = int(differs[0]) if len(differs) else 0
    if num_context and not bool((ids[:, start : start + num_context] == only_placeholder[start]).all()):
        raise ValueError(
            f"the tokenizer of {backbone.name!r} does not give one token per context placeholder"
        )
    ends = backbone.pooled_positions(ids)
    too_long = [names[i] for i in range(len(names)) if int(ends[i]) >= ids.shape[1] - 1 and ids[i, -1] != 0]
    if too_long:
        raise ValueError(
            f"class prompts of {too_long[:3]} do not fit the text tower's {ids.shape[1]} tokens with "
            f"{num_context} context tokens; shorten the class names or use fewer context tokens"
        )
    with constant_tensors():
        embeddings = backbone.token_embeddings(ids)
    return ClassTokens(tuple(names), ids, embeddings, start, num_context)


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
    count, start, m = len(tokens.names), tokens.start, tokens.num_context
    if context.shape[-2] != m:
        raise ValueError(f"{context.shape[-2]} context vectors for class prompts with {m} placeholders")
    embeds = tokens.embeddings
    rows = context.to(embeds.dtype)
    rows = rows.expand(count, -1, -1) if rows.dim() == 2 else rows
    x = torch.cat([embeds[:, :start], rows, embeds[:, start + m :]], dim=1)

    def overwrite(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if deep is None or not 1 <= layer <= deep.shape[0]:
            return hidden
        prompt = deep[layer - 1].to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([hidden[:, :start], prompt, hidden[:, start + m :]], dim=1)

    return backbone.text_features(x, tokens.ids, overwrite if deep is not None else None, full_length)


class TextContext(nn.Module):
    """Owns CoOp's learned context (the prompt of PromptFL): M vectors before the class-name tokens.

    ``context`` is [M, d] (shared by all classes) or [C, M, d] (class-specific, for the classes
    ``class_names`` only). ``deep`` ([J-1, M, d], optional) holds shared prompts for text layers
    1..J-1 as MaPLe uses them; CoOp and PromptFL have none (depth 1).
    """

    def __init__(
        self,
        context: torch.Tensor,
        deep: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
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
        self.class_names = tuple(class_names) if context.dim() == 3 and class_names is not None else None
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
        key = (tuple(names), str(backbone.device))
        if key not in self._tokens:
            self._tokens[key] = tokenize_classes(backbone, names, self.num_tokens)
        return context_class_features(backbone, self._tokens[key], self.context, self.deep, full_length)


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
