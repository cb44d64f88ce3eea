"""Image-side prompts of CLIP: none (cached features), VPT tokens, and pixel-space prompts (TPFL).

Every image side says which input it takes (``ImageInput``) and computes that input from
preprocessed pixels with ``prepare`` (prompt-independent, so it is computed once and cached);
``features(backbone, batch, text)`` accepts either that cached input or raw ``pixels`` and gives
the same features; ``text`` is the text side beside it, which only coupled prompts read.

Random choices while training (a random patch's position, VPT's prompt dropout) are drawn from the
batch's ``BATCH_SEED`` (one seed per training step, which the training data draws from the
client's seeded generator), never from a generator that a module carries from call to call: a
client, round and step give the same draws whatever ran before them in the process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prompt_modules.base import Batch
from prompt_modules.clip_backbone import OpenCLIPBackbone

PixelMethod = Literal["patch", "frame", "random-patch"]
VPTPlacement = Literal["after-ln-pre", "before-ln-pre"]
BATCH_SEED = "batch_seed"
"""Batch key of the training step's seed: an int64 tensor of one element."""


def batch_generator(batch: Batch, what: str) -> torch.Generator:
    """A CPU generator seeded by the batch's ``BATCH_SEED``; ValueError naming ``what`` without one."""
    if BATCH_SEED not in batch:
        raise ValueError(
            f"{what} needs the training step's seed (batch key {BATCH_SEED!r}), which the training data "
            "adds to each batch"
        )
    return torch.Generator().manual_seed(int(batch[BATCH_SEED].reshape(-1)[0]))


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
    backbone: OpenCLIPBackbone,
    hidden: torch.Tensor,
    start_layer: int,
    prompts: torch.Tensor,
    *,
    placement: VPTPlacement = "after-ln-pre",
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Image features [B, D] from the hidden states at the input of ``start_layer`` and VPT prompts.

    ``prompts`` [n, p, d]: layer ``start_layer`` gets [CLS; P_0; patches] (the p prompt tokens are
    inserted after the class token, without positional embedding); each layer ``start_layer + i``
    for 0 < i < n overwrites those p positions with P_i, discarding the previous layer's outputs
    there; later layers carry them on. The prompt positions are dropped before the tower's pooling.

    ``placement``: ``after-ln-pre`` puts P_0 into the sequence after the tower's pre-norm (VPT);
    ``before-ln-pre`` puts it in before (MaPLe), so P_0 goes through ``ln_pre`` with the patches
    (``start_layer`` 0 only). ``dropout``: VPT's prompt dropout, a mask per example and layer drawn
    from ``generator`` (inverted dropout: kept entries are scaled by 1 / (1 − p)). ``observe`` is
    called with (layer, the block's input) before every block from ``start_layer`` on, prompts in.
    """
    count, p = prompts.shape[0], prompts.shape[1]
    if placement == "before-ln-pre" and start_layer != 0:
        raise ValueError("visual prompts go before ln_pre only when they start at layer 0")
    if dropout > 0 and generator is None:
        raise ValueError("prompt dropout needs a generator")

    def place(layer: int, x: torch.Tensor) -> torch.Tensor:
        x = insert(layer, x)
        if observe is not None:
            observe(layer, x)
        return x

    def insert(layer: int, x: torch.Tensor) -> torch.Tensor:
        offset = layer - start_layer
        if offset >= count:
            return x
        rows = prompts[offset]
        if offset == 0 and placement == "before-ln-pre":
            rows = backbone.vision_pre_norm(rows)
        rows = rows.to(x.dtype).expand(x.shape[0], -1, -1)
        if dropout > 0:
            keep = torch.rand(rows.shape, generator=generator) >= dropout
            rows = rows * keep.to(rows.device, rows.dtype) / (1 - dropout)
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
    ``start_layer`` never see a prompt, so their outputs are cached (``prepare``). ``placement``
    and ``dropout`` as in ``vpt_features``; dropout acts while training only.
    """

    def __init__(
        self,
        prompts: torch.Tensor,
        start_layer: int = 0,
        placement: VPTPlacement = "after-ln-pre",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if prompts.dim() != 3:
            raise ValueError(f"VPT prompts are [layers, tokens, width]; got shape {tuple(prompts.shape)}")
        if placement == "before-ln-pre" and start_layer != 0:
            raise ValueError("visual prompts go before ln_pre only when they start at layer 0")
        if not 0 <= dropout < 1:
            raise ValueError(f"prompt dropout must be in [0, 1), got {dropout}")
        self.prompts = nn.Parameter(prompts.clone())
        self.start_layer = start_layer
        self.placement: VPTPlacement = placement
        self.dropout = dropout
        self.input = ImageInput("image_tokens", start_layer)

    def prepare(self, backbone: OpenCLIPBackbone, pixels: torch.Tensor) -> torch.Tensor:
        return backbone.vision_layers(backbone.image_embeddings(pixels), 0, self.start_layer)

    def features(
        self, backbone: OpenCLIPBackbone, batch: Batch, text: nn.Module | None = None
    ) -> torch.Tensor:
        hidden = batch["image_tokens"] if "image_tokens" in batch else self.prepare(backbone, batch["pixels"])
        dropping = self.training and self.dropout > 0
        return vpt_features(
            backbone,
            hidden,
            self.start_layer,
            self.prompts,
            placement=self.placement,
            dropout=self.dropout if dropping else 0.0,
            generator=batch_generator(batch, "VPT prompt dropout") if dropping else None,
        )


class PixelPrompt(nn.Module):
    """Owns a learned pixel-space prompt added to the preprocessed image (visual prompting, TPFL).

    - ``patch``: a 3×s×s patch added at the top-left corner;
    - ``frame``: a learned frame over the outer s pixels of each side (four strips: top, bottom,
      left, right), added to the image;
    - ``random-patch``: a 3×s×s patch added at a random position, one per image. While training,
      the positions come from the batch's ``BATCH_SEED``. At evaluation the patch sits at the
      image centre, or, with ``random_at_eval`` (Bahng et al.'s random prompter, random at test
      time too), at random positions that are the same in every evaluation: image j of a batch
      takes the j-th position of a sequence drawn from ``seed``.

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
        random_at_eval: bool = False,
    ) -> None:
        super().__init__()
        height, width = image_size
        limit = min(height, width) // 2 if method == "frame" else min(height, width)
        if not 1 <= size <= limit:
            raise ValueError(
                f"a {method} prompt of size {size} does not fit {height}x{width} images (1..{limit})"
            )
        if random_at_eval and method != "random-patch":
            raise ValueError(f"random_at_eval applies to random-patch prompts only, not {method!r}")
        self.method, self.size, self.image_size = method, size, (height, width)
        self.random_at_eval = random_at_eval
        self.eval_seed = seed + 1
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

    def positions(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """Top-left corners [count, 2] (row, column) of a random patch on ``count`` images: uniform
        over the places the patch fits, drawn from ``generator``, or the image centre when it is None."""
        (height, width), s = self.image_size, self.size
        if generator is None:
            return torch.tensor([[(height - s) // 2, (width - s) // 2]]).expand(count, -1)
        # one (row, column) pair per image, image after image: image j's corner is the same however
        # many images follow it
        uniform = torch.rand(count, 2, generator=generator, dtype=torch.float64)
        return (uniform * torch.tensor([height - s + 1, width - s + 1])).long()

    def prompt_image(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt as an image, zero where it does not reach: [3, H, W] for a patch or frame,
        [count, 3, H, W] for a random patch at ``positions`` [count, 2] (the centre when None)."""
        (height, width), s = self.image_size, self.size
        if self.method == "frame":
            middle = torch.cat(
                [self.left, self.top.new_zeros(3, height - 2 * s, width - 2 * s), self.right], dim=2
            )
            return torch.cat([self.top, middle, self.bottom], dim=1)
        pad = nn.functional.pad
        if self.method == "patch":
            return pad(self.patch, (0, width - s, 0, height - s))
        corners = self.positions(1, None) if positions is None else positions
        return torch.stack(
            [pad(self.patch, (col, width - s - col, row, height - s - row)) for row, col in corners.tolist()]
        )

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
        if self.method != "random-patch":
            return backbone.encode_image(pixels + self.prompt_image().to(pixels.dtype))
        if self.training:
            generator: torch.Generator | None = batch_generator(batch, "a random-patch prompt")
        else:
            generator = torch.Generator().manual_seed(self.eval_seed) if self.random_at_eval else None
        prompt = self.prompt_image(self.positions(pixels.shape[0], generator))
        return backbone.encode_image(pixels + prompt.to(pixels.device, pixels.dtype))
