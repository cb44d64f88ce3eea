"""Twin prompts' coupling (MaPLe-style): the visual prompt as a learned function of the text prompt."""

from __future__ import annotations

import torch
from torch import nn

from prompt_modules.base import Batch
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_text_context import TextContext
from prompt_modules.visual_prompts import ImageInput, VPTPlacement, vpt_features


class CoupledVisualPrompt(nn.Module):
    """Owns MaPLe's coupling maps W_ℓ (one ``nn.Linear(d_text, d_vis)`` per prompted vision layer).

    The visual prompt of vision layer ``start_layer + i`` is W_i applied to the text prompt of
    text layer ``start_layer + i`` (``TextContext.layer_prompts``), so the text side must prompt
    those layers too. The visual tokens then go through the tower as VPT tokens do
    (``vpt_features``, with its ``placement``: MaPLe's is ``before-ln-pre``); the layers below
    ``start_layer`` are cached in the same way.
    """

    def __init__(
        self,
        text_width: int,
        vision_width: int,
        layers: int,
        start_layer: int = 0,
        placement: VPTPlacement = "after-ln-pre",
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a coupled visual prompt needs at least one layer, got {layers}")
        if placement == "before-ln-pre" and start_layer != 0:
            raise ValueError("visual prompts go before ln_pre only when they start at layer 0")
        self.maps = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(layers))
        self.start_layer = start_layer
        self.placement: VPTPlacement = placement
        self.input = ImageInput("image_tokens", start_layer)

    def prepare(self, backbone: OpenCLIPBackbone, pixels: torch.Tensor) -> torch.Tensor:
        return backbone.vision_layers(backbone.image_embeddings(pixels), 0, self.start_layer)

    def visual_prompts(self, text: TextContext) -> torch.Tensor:
        """The visual prompts [n, M, d_vis] made from the text side's layer prompts."""
        text_layers = text.layer_prompts()
        last = self.start_layer + len(self.maps)
        if last > len(text_layers):
            raise ValueError(
                f"coupled visual prompts for layers {self.start_layer}..{last - 1} need text prompts in "
                f"those layers; the text context prompts {len(text_layers)} layer(s) (raise its depth)"
            )
        return torch.stack([w(text_layers[self.start_layer + i]) for i, w in enumerate(self.maps)])

    def features(
        self, backbone: OpenCLIPBackbone, batch: Batch, text: nn.Module | None = None
    ) -> torch.Tensor:
        if not isinstance(text, TextContext):
            raise ValueError("a coupled visual prompt needs a learned text context beside it")
        hidden = batch["image_tokens"] if "image_tokens" in batch else self.prepare(backbone, batch["pixels"])
        return vpt_features(
            backbone, hidden, self.start_layer, self.visual_prompts(text), placement=self.placement
        )
