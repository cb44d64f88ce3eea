"""Helpers of the CLIP tests: a tiny open_clip model, its checkpoint file, and a generated image set.

The tiny model (ViT width 64, 2 layers, 32×32 images, patch 8; text tower width 64, 2 layers,
context 77 and CLIP's own tokenizer) is registered with open_clip from a JSON config file; nothing
is downloaded. A randomly initialised CLIP's image features barely depend on the image (mean
pairwise cosine 0.99 on the digits), so no prompt could classify through it. ``build_tiny_clip``
therefore gives the random model one thing a pretrained CLIP has: its image projection is fitted
(ridge regression, closed form) so that images land near the text features of their class names,
and its logit scale is set to 100, where CLIP's training leaves it.
Everything else stays random, and the result is saved as a safetensors checkpoint that the tests
load through the real ``pretrained=<file>`` path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "fedprompt-tiny-clip"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
"""The generated image set: one class per colour of a square on a noisy grey background."""


def write_tiny_clip_config(folder: Path) -> Path:
    """The tiny model's open_clip config file (its stem is the model name)."""
    path = folder / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def write_generated_images(folder: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """An image folder ``<split>/<colour>/<i>.png``: a square of the class colour, random size and
    position, on grey noise; `per_class` maps split -> images per class."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name, color in COLORS.items():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(90, 160, size=(32, 32, 3)).astype(np.uint8)
                side = int(rng.integers(10, 20))
                top, left = (int(v) for v in rng.integers(0, 32 - side, size=2))
                jitter = rng.integers(-25, 25, size=3)
                image[top : top + side, left : left + side] = np.clip(np.array(color) + jitter, 0, 255)
                Image.fromarray(image).save(folder / split / name / f"{i}.png")
    return folder


@dataclass(frozen=True)
class TinyClip:
    """The files the CLIP tests share: the model config, its checkpoint, the generated image folder."""

    config: Path
    checkpoint: Path
    generated: Path


def build_tiny_clip(folder: Path) -> TinyClip:
    """Write the generated image folder, the tiny model's config and its checkpoint, whose image
    projection maps the training images of the digits and of the generated set to the text features
    of their class names (ridge regression) and whose logit scale is 100."""
    import datasets

    from fedprompt.data.images import load_digits
    from prompt_modules.clip_backbone import OpenCLIPBackbone

    generated = write_generated_images(folder / "generated", {"train": 40, "test": 20})
    config = write_tiny_clip_config(folder)
    backbone = OpenCLIPBackbone.load(str(config), None, seed=0)
    digits = load_digits(0).select(range(600))
    colours = datasets.load_dataset("imagefolder", data_dir=str(generated), split="train")
    visual = backbone.model.visual
    pooled, targets = [], []
    with torch.no_grad():
        for images in (digits, colours):
            pixels = torch.stack([backbone.preprocess(image.convert("RGB")) for image in images["image"]])
            pooled.append(visual._pool(visual.transformer(visual._embeds(pixels)))[0])
            names = images.features["label"].names
            targets.append(F.normalize(backbone.encode_text(names), dim=-1)[torch.tensor(images["label"])])
        h, t = torch.cat(pooled), torch.cat(targets)
        visual.proj.copy_(torch.linalg.solve(h.T @ h + 0.1 * torch.eye(h.shape[1]), h.T @ t))
        backbone.model.logit_scale.fill_(math.log(100.0))  # a trained CLIP's scale (random init: 1 / 0.07)
    checkpoint = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(checkpoint))
    return TinyClip(config, checkpoint, generated)


def clip_run_config(tiny: TinyClip, prompt: dict, data: dict, **sections) -> dict:
    """A seconds-long federated run of ``prompt`` on the tiny CLIP: 3 IID clients, 3 rounds."""
    config = {
        "name": "tiny-clip",
        "seed": 0,
        "backbone": {"kind": "open-clip", "model": str(tiny.config), "pretrained": str(tiny.checkpoint)},
        "prompt": prompt,
        "data": data,
        "partition": {"kind": "iid", "num_clients": 3, "local_val_fraction": 0.0},
        "federation": {"rounds": 3, "min_clients": 3, "local_evaluation": False},
        "optimizer": {"kind": "gradient", "algorithm": "adamw", "lr": 0.02, "epochs": 2, "batch_size": 16},
        "runtime": {"device": "cpu", "progress": False, "eval_batch_size": 128},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config
