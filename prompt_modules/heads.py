"""Class heads described as plain data: what a client tells a remote backbone about its classes.

A spec holds only text (label descriptions or label words) and numbers, so it travels as JSON
and the party holding the backbone builds the head from it, exactly as a local run does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.text_classifier import SimilarityHead, VerbalizerHead

MAX_CLASSES = 1000
_Text = Annotated[str, Field(min_length=1, max_length=1000)]


class SimilarityHeadSpec(BaseModel):
    """Sentence-encoder head: one description per class, scored by cosine similarity / temperature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["similarity"] = "similarity"
    descriptions: tuple[_Text, ...] = Field(min_length=2, max_length=MAX_CLASSES)
    temperature: float = Field(0.05, gt=0, allow_inf_nan=False)
    pooling: Literal["mean", "cls"] = "mean"

    @property
    def num_classes(self) -> int:
        return len(self.descriptions)


class VerbalizerHeadSpec(BaseModel):
    """Language-model head: the label words of each class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["verbalizer"] = "verbalizer"
    label_words: tuple[tuple[_Text, ...], ...] = Field(min_length=2, max_length=MAX_CLASSES)

    @property
    def num_classes(self) -> int:
        return len(self.label_words)


HeadSpec = Annotated[SimilarityHeadSpec | VerbalizerHeadSpec, Field(discriminator="kind")]


def build_head(
    backbone: HFTextBackbone, spec: SimilarityHeadSpec | VerbalizerHeadSpec
) -> SimilarityHead | VerbalizerHead:
    """The head a spec describes, computed once through the frozen backbone."""
    if isinstance(spec, SimilarityHeadSpec):
        return SimilarityHead.from_descriptions(
            backbone, list(spec.descriptions), spec.temperature, spec.pooling
        )
    return VerbalizerHead.from_label_words(backbone, [list(words) for words in spec.label_words])
