"""Training-time randomness of image batches: CoOp's augmentation (random resized crop and
horizontal flip), augmented views cached per image, and the per-step seed that random visual
prompts draw from.

Every draw comes from a seed: a cached view from the run seed, the image's row and the view's
number; a training step's draws from the trainer's generator (seeded per client and round by the
run seed), one step after the other. So a client, round and step see the same augmentation and
the same random prompt positions whatever ran before them, in-process and on Flower alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.training.batching import TensorData
from prompt_modules.visual_prompts import BATCH_SEED

VIEWS = "image_feature_views"
"""Training-data key of cached views: image features [N, K, D], K augmented views per image."""


@dataclass(frozen=True)
class CropFlip:
    """CoOp's training augmentation on a preprocessed image [3, H, W]: torchvision's random
    resized crop (area share in ``scale``, aspect ratio in ``ratio``) resized back to H × W, then a
    horizontal flip with probability 1/2 when ``flip``.

    It works on the preprocessed tensor (the image already resized and centre-cropped to the
    model's input), so a crop is taken from that square. Resizing is linear, so cropping the
    normalised tensor equals normalising the cropped image.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The augmented image, a function of ``image`` and ``seed`` only."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, height, width = T.RandomResizedCrop.get_params(
                image, list(self.scale), list(self.ratio)
            )
            flip = self.flip and bool(torch.rand(1) < 0.5)
        out = TF.resized_crop(image, top, left, height, width, list(image.shape[-2:]), antialias=True)
        return out.flip(-1) if flip else out


def view_seed(run_seed: int, row: int, view: int) -> int:
    """The seed of view ``view`` of training image ``row`` (its index in the full training set)."""
    return derive_seed(run_seed, "augment-view", row, view)


@dataclass
class SeededTrainData(TensorData):
    """A client's training examples whose batches carry the training step's randomness.

    Given the trainer's ``generator``, each batch draws one seed s from it and carries it as
    ``BATCH_SEED`` (random visual prompts draw from it); from s then come:

    - with cached views (``VIEWS`` [N, K, D] in ``tensors``): ``image_features`` [B, D], one view per
      example;
    - with ``augment`` and ``pixels`` in ``tensors``: each image cropped and flipped.

    Without a generator (evaluation order) there is no step: the first view, the plain pixels and
    no seed.
    """

    augment: CropFlip | None = None

    def batches(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().batches(batch_size, generator=generator, device="cpu"):
            views = batch.pop(VIEWS, None)
            seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
            draws = torch_generator(derive_seed(seed, "augment")) if seed is not None else None
            if views is not None:
                pick = (
                    torch.zeros(len(views), dtype=torch.long)
                    if draws is None
                    else torch.randint(views.shape[1], (len(views),), generator=draws)
                )
                batch["image_features"] = views[torch.arange(len(views)), pick]
            if self.augment is not None and draws is not None and "pixels" in batch:
                seeds = torch.randint(2**62, (len(batch["pixels"]),), generator=draws).tolist()
                batch["pixels"] = torch.stack(
                    [self.augment(p, s) for p, s in zip(batch["pixels"], seeds, strict=True)]
                )
            moved = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
            if seed is not None:
                moved[BATCH_SEED] = torch.tensor([seed], dtype=torch.int64)  # stays on the CPU
            yield moved
