"""Image-side prompts of CLIP: none (cached features), VPT tokens, and pixel-space prompts (TPFL).

Every image side says which input it takes (``ImageInput``) and computes that input from
preprocessed pixels with ``prepare`` (prompt-independent, so it is computed once and cached);
``features(backbone, batch, text)`` accepts either that cached input or raw ``pixels`` and gives
the same features; ``text`` is the text side beside it, which only coupled prompts read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prompt_modules.base import Batch
from prompt_modules.clip_backbone import OpenCLIPBackbone

PixelMethod = Literal["patch", "frame", "random-patch"]


@dataclass(frozen=True)
class ImageInput:
    """What an image side reads from a batch: ``image_features`` [B, D] (the tower's output),
    ``image_tokens`` [B, T, d] (the hidden states at the input of vision layer ``layer``) or
    ``pixels`` [B, 3, H, W] (preprocessed images)."""

    key: Literal["image_features", "image_tokens", "pixels"]
    layer: int = 0

    @property
    def name(self) -> str:
        """A name for caches: what is stored and, for hidden states, from which layer."""
        return f"{self.key}-layer{self.layer}" if self.key == "image_tokens" else self.key


class FrozenImage(nn.Module):
    """Owns nothing trainable: CLIP's image features, computed once per image and cached.

    Text-side prompts (CoOp context, the prompt generator) pair with it: a training step then
    never runs the image tower.
    """

    input = ImageInput("image_features")

    def prepare(self, backbone: OpenCLIPBackbone, pixels: torch.Tensor) -> torch.Tensor:
        return backbone.encode_image(pixels)

    def features(
        self, backbone: OpenCLIPBackbone, batch: Batch, text: nn.Module | None = None
    ) -> torch.Tensor:
        if "image_features" in batch:
            return batch["image_features"].float()
        return self.prepare(backbone, batch["pixels"])


def vpt_features(
    backbone: OpenCLIPBackbone, hidden: torch.Tensor, start_layer: int, prompts: torch.Tensor
) -> torch.Tensor:
    """Image features [B, D] from the hidden states at the input of ``start_layer`` and VPT prompts.

    ``prompts`` [n, p, d]: layer ``start_layer`` gets [CLS; P_0; patches] (the p prompt tokens are
    inserted after the class token, without positional embedding); each layer ``start_layer + i``
    for 0 < i < n overwrites those p positions with P_i, discarding the previous layer's outputs
    there; later layers carry them on. The prompt positions are dropped before the tower's pooling.
    """
    count, p = prompts.shape[0], prompts.shape[1]

    def place(layer: int, x: torch.Tensor) -> torch.Tensor:
        offset = layer - start_layer
        if offset >= count:
            return x
        rows = prompts[offset].to(x.dtype).expand(x.shape[0], -1, -1)
        keep_from = 1 if offset == 0 else 1 + p
        return torch.cat([x[:, :1], rows, x[:, keep_from:]], dim=1)

    out = backbone.vision_layers(hidden, start_layer, layer_hook=place)
    return backbone.image_head(torch.cat([out[:, :1], out[:, 1 + p :]], dim=1))


def vpt_init(
    backbone: OpenCLIPBackbone, layers: int, num_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """VPT's initialisation: uniform in ±sqrt(6 / (3·patch_h·patch_w + d)), [layers, p, d]."""
    ph, pw = backbone.patch_size
    width = backbone.vision_width
    bound = math.sqrt(6.0 / (3 * ph * pw + width))
    return (torch.rand(layers, num_tokens, width, generator=generator) * 2 - 1) * bound


class VisualTokenPrompt(nn.Module):
    """Owns VPT's prompt tokens ``prompts`` [n, p, d_vis] for vision layers start_layer..start_layer+n-1.

    Shallow VPT is n = 1 (inserted at ``start_layer``, by default the input layer, and carried
    through); deep VPT gives every layer from ``start_layer`` up its own tokens. Layers below
    ``start_layer`` never see a prompt, so their outputs are cached (``prepare``).
    """

    def __init__(self, prompts: torch.Tensor, start_layer: int = 0) -> None:
        super().__init__()
        if prompts.dim() != 3:
            raise ValueError(f"VPT prompts are [layers, tokens, width]; got shape {tuple(prompts.shape)}")
        self.prompts = nn.Parameter(prompts.clone())
        self.start_layer = start_layer
        self.input = ImageInput("image_tokens", start_layer)

    def prepare(self, backbone: OpenCLIPBackbone, pixels: torch.Tensor) -> torch.Tensor:
        return backbone.vision_layers(backbone.image_embeddings(pixels), 0, self.start_layer)

    def features(
        self, backbone: OpenCLIPBackbone, batch: Batch, text: nn.Module | None = None
    ) -> torch.Tensor:
        hidden = batch["image_tokens"] if "image_tokens" in batch else self.prepare(backbone, batch["pixels"])
        return vpt_features(backbone, hidden, self.start_layer, self.prompts)


class PixelPrompt(nn.Module):
    """Owns a learned pixel-space prompt added to the preprocessed image (visual prompting, TPFL).

    - ``patch``: a 3×s×s patch added at the top-left corner;
    - ``frame``: a learned frame over the outer s pixels of each side (four strips: top, bottom,
      left, right), added to the image;
    - ``random-patch``: a 3×s×s patch added at a random position, one per batch, drawn from the
      module's own seeded generator while training; at evaluation it sits at the image centre.

    The prompt changes the image tower's input, so nothing of the tower can be cached for it.
    """

    input = ImageInput("pixels")

    def __init__(
        self,
        method: PixelMethod,
        size: int,
        image_size: tuple[int, int],
        init_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        height, width = image_size
        limit = min(height, width) // 2 if method == "frame" else min(height, width)
        if not 1 <= size <= limit:
            raise ValueError(
                f"a {method} prompt of size {size} does not fit {height}x{width} images (1..{limit})"
            )
        self.method, self.size, self.image_size = method, size, (height, width)
        generator = torch.Generator().manual_seed(seed)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * init_std)

        if method == "frame":
            self.top, self.bottom = param(3, size, width), param(3, size, width)
            self.left, self.right = param(3, height - 2 * size, size), param(3, height - 2 * size, size)
        elif method in ("patch", "random-patch"):
            self.patch = param(3, size, size)
        else:
            raise ValueError(f"unknown pixel prompt {method!r}; use 'patch', 'frame' or 'random-patch'")
        self._positions = torch.Generator().manual_seed(seed + 1)

    def prompt_image(self) -> torch.Tensor:
        """The prompt as a [3, H, W] image (zero where it does not reach)."""
        (height, width), s = self.image_size, self.size
        if self.method == "frame":
            middle = torch.cat(
                [self.left, self.top.new_zeros(3, height - 2 * s, width - 2 * s), self.right], dim=2
            )
            return torch.cat([self.top, middle, self.bottom], dim=1)
        if self.method == "patch":
            row, col = 0, 0
        elif self.training:
            row = int(torch.randint(height - s + 1, (1,), generator=self._positions))
            col = int(torch.randint(width - s + 1, (1,), generator=self._positions))
        else:
            row, col = (height - s) // 2, (width - s) // 2
        return nn.functional.pad(self.patch, (col, width - s - col, row, height - s - row))

    def prepare(self, backbone: OpenCLIPBackbone, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def features(
        self, backbone: OpenCLIPBackbone, batch: Batch, text: nn.Module | None = None
    ) -> torch.Tensor:
        pixels = batch["pixels"]
        if tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(pixels.shape[-2:])}, the pixel prompt is for {self.image_size}"
            )
        return backbone.encode_image(pixels + self.prompt_image().to(pixels.dtype))
