"""Fed-BBPT for CLIP image classification (Lin et al. 2023, with a BlackVIP-style generator): each
client's small network writes a visual prompt *per image*, added to the image's pixels before they
go to a CLIP it can only query for logits; only the generator is trained (by SPSA from those
logits) and aggregated.

The generator (a light coordinator, as BlackVIP's): the image seen at a low resolution (average
pooled to grid × grid, 3·grid² values) → tanh(W₁x + b₁) (``hidden`` units) → W₂h + b₂, a
3 × p × p prompt upsampled (bilinear) to the image's size and scaled by ``scale``. W₂ and b₂ start
at zero, so the first prompt is nothing. All weights are one vector (what SPSA perturbs).

``CLIPLogitsAPI`` is the black box: prompted pixels in, class logits out, under
``torch.inference_mode``, every image counted as one query. ``BlackBoxCLIPClassifier`` scores
populations of generator weights through it alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.base import Batch
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.visual_prompts import ImageInput


class VisualPromptGenerator(nn.Module):
    """Owns the generator's weights (``weights``: W₁ [hidden, 3·grid²], b₁, W₂ [3·p², hidden], b₂)."""

    input = ImageInput("pixels")

    def __init__(self, grid: int, hidden: int, prompt_size: int, scale: float, seed: int) -> None:
        super().__init__()
        if min(grid, hidden, prompt_size) < 1 or not scale > 0:
            raise ValueError(
                f"a visual prompt generator needs positive sizes and scale, got {grid}, {hidden}, "
                f"{prompt_size}, {scale}"
            )
        self.grid, self.hidden, self.prompt_size, self.scale = grid, hidden, prompt_size, scale
        inputs = 3 * grid * grid
        generator = torch.Generator().manual_seed(seed)
        weights = torch.zeros(self.num_weights)
        weights[: hidden * inputs] = (torch.randn(hidden, inputs, generator=generator) / inputs**0.5).reshape(
            -1
        )
        self.weights = nn.Parameter(weights)

    @property
    def num_weights(self) -> int:
        inputs, outputs = 3 * self.grid**2, 3 * self.prompt_size**2
        return self.hidden * inputs + self.hidden + outputs * self.hidden + outputs

    def prompts(self, pixels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The visual prompt [B, 3, H, W] of each image of ``pixels`` [B, 3, H, W] (differentiable)."""
        w = (self.weights if weights is None else weights).to(pixels)
        inputs, outputs, h = 3 * self.grid**2, 3 * self.prompt_size**2, self.hidden
        w1 = w[: h * inputs].reshape(h, inputs)
        b1 = w[h * inputs : h * inputs + h]
        w2 = w[h * inputs + h : h * inputs + h + outputs * h].reshape(outputs, h)
        b2 = w[h * inputs + h + outputs * h :]
        x = F.adaptive_avg_pool2d(pixels, self.grid).flatten(1)
        small = (torch.tanh(x @ w1.T + b1) @ w2.T + b2).reshape(-1, 3, self.prompt_size, self.prompt_size)
        return self.scale * F.interpolate(small, size=pixels.shape[-2:], mode="bilinear", align_corners=False)

    def prepare(self, backbone: OpenCLIPBackbone, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def features(
        self, backbone: OpenCLIPBackbone, batch: Batch, text: nn.Module | None = None
    ) -> torch.Tensor:
        pixels = batch["pixels"].to(backbone.device)
        return backbone.encode_image(pixels + self.prompts(pixels))


class CLIPLogitsAPI:
    """A CLIP seen as a black box: prompted pixels in, class logits out (no graph), each image one
    query. Owns the query count."""

    def __init__(self, classifier: CLIPPromptClassifier) -> None:
        self._classifier = classifier
        self.queries = 0

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            model = self._classifier
            features = F.normalize(model.backbone.encode_image(pixels), dim=-1)
            out = model.logits_from(features, model.class_features()).float()
        self.queries += pixels.shape[0]
        return out.clone()


class BlackBoxCLIPClassifier(CLIPPromptClassifier):
    """A ``CLIPPromptClassifier`` with a fixed class text and a ``VisualPromptGenerator`` image side,
    whose training reaches CLIP only through ``CLIPLogitsAPI`` (a ``PopulationModule`` over the
    generator's weights; its forward pass, for the white-box baseline and evaluation, is the usual)."""

    def __init__(
        self,
        backbone: OpenCLIPBackbone,
        text: nn.Module,
        image: VisualPromptGenerator,
        class_names: Sequence[str],
    ) -> None:
        super().__init__(backbone, text, image, class_names)
        self.api = CLIPLogitsAPI(self)

    def population_logits(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class logits [P, B, C] under each candidate weight vector [P, n]."""
        pixels = batch["pixels"].to(self.backbone.device)
        with torch.no_grad():
            return torch.stack([self.api.logits(pixels + self.image.prompts(pixels, c)) for c in candidates])

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate on the batch (from the black box's logits)."""
        logits = self.population_logits(candidates, batch)
        labels = batch["labels"].to(logits.device)
        return torch.stack([F.cross_entropy(one, labels) for one in logits])
