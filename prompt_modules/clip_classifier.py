"""Image classification through a frozen CLIP with prompts on the text side, the image side, or both."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.base import Batch, PromptModule
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_parts import FeatureMemo, checked_part_settings, part_param_groups
from prompt_modules.visual_prompts import ImageInput

PARTS = ("text", "image")


class ClassSetClassifier(PromptModule):
    """Owns what every CLIP classifier shares: the class set scored (the training classes, or
    another one inside ``scoring(names)``), the memo of features computed without gradients, and
    the image side's batch input (``image_input``, ``prepare_images``). A subclass sets ``image``."""

    image: nn.Module

    def __init__(self, backbone: OpenCLIPBackbone, class_names: Sequence[str]) -> None:
        super().__init__(backbone)
        if not class_names:
            raise ValueError("a CLIP classifier needs at least one class name")
        self._classes = tuple(class_names)
        self._memo = FeatureMemo()

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._classes

    @property
    def image_input(self) -> ImageInput:
        """What the image side reads from a batch (and what is worth caching for it)."""
        return self.image.input

    @torch.no_grad()
    def prepare_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image side's batch input for preprocessed images: prompt-independent, so cacheable."""
        return self.image.prepare(self.backbone, pixels)

    @contextmanager
    def scoring(self, class_names: Sequence[str]) -> Iterator[None]:
        """Score against ``class_names`` (e.g. novel classes) inside the block, then go back."""
        previous = self._classes
        self._classes = tuple(class_names)
        try:
            yield
        finally:
            self._classes = previous


class CLIPPromptClassifier(ClassSetClassifier):
    """Owns a text side and an image side of prompts; logits are CLIP's scaled cosine similarities.

    p(y = c | x) ∝ exp(s · cos(g_c, f(x)) + b): g_c from the text side (``FixedClassText``,
    ``TextContext``, ``PromptGenerator``), f(x) from the image side (``FrozenImage``,
    ``VisualTokenPrompt``, ``PixelPrompt``, ``CoupledVisualPrompt``), s = CLIP's logit scale (b
    its bias, SigLIP-style models only). The state_dict holds the two sides' prompt state under
    ``text.`` and ``image.``. ``part_settings`` gives each side its own optimiser settings
    (``lr``, ``weight_decay``, ``momentum``), read by the trainer through ``param_groups``.

    The class set scored is the training classes, or another one inside ``scoring(names)``
    (base-to-novel evaluation). Without gradients, the class features of an unchanged prompt
    state are computed once and reused across batches.
    """

    def __init__(
        self,
        backbone: OpenCLIPBackbone,
        text: nn.Module,
        image: nn.Module,
        class_names: Sequence[str],
        part_settings: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        super().__init__(backbone, class_names)
        self._part_settings = checked_part_settings(part_settings, PARTS)
        self.text = text
        self.image = image

    def class_features(self, full_length: bool = False) -> torch.Tensor:
        """Normalised text features [C, D] of the classes scored now."""
        key = (
            self._classes,
            full_length,
            str(self.backbone.device),
            tuple((id(p), p._version) for p in self.parameters()),
        )
        return self._memo.get(
            key,
            lambda: F.normalize(self.text.class_features(self.backbone, self._classes, full_length), dim=-1),
        )

    def image_features(self, batch: Batch) -> torch.Tensor:
        """Normalised image features [B, D] of a batch (from its cached input or its pixels)."""
        return F.normalize(self.image.features(self.backbone, batch, self.text), dim=-1)

    def logits_from(self, image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.logit_scale.to(image_features.device) * image_features @ class_features.T
        bias = self.backbone.logit_bias
        return logits if bias is None else logits + bias.to(logits.device)

    def forward_with_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and the normalised image features [B, D] they came from."""
        logits, image, _ = self.forward_with_all_features(batch)
        return logits, image

    def forward_with_all_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [B, C], the normalised image features [B, D] and class features [C, D] they came from."""
        image = self.image_features(batch)
        classes = self.class_features()
        return self.logits_from(image, classes), image, classes

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_with_features(batch)[0]

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimiser parameter group per side that has trainable parameters, with its settings."""
        return part_param_groups({"text": (self.text,), "image": (self.image,)}, self._part_settings)
