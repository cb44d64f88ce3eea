"""``bundled:demo-clip``: a small CLIP pre-trained offline, once, so that vision-language demos run on
a backbone whose features mean something. It is a demo backbone, not a real CLIP, and says so.

No package ships pretrained CLIP weights, and a randomly initialised CLIP gives every image nearly the
same features. The demo backbone is an open_clip model (``DEMO_CLIP_MODEL``: a ViT of 4 layers on
32×32 images in patches of 8, a text transformer of 4 layers with CLIP's tokenizer, a 64-d joint
space) whose two towers are trained together from random weights with CLIP's symmetric contrastive
loss on image-caption pairs that installed packages ship:

- scikit-learn's digits, a seeded tenth of each class's images (``digit_image_fraction``: about 18
  per class), captioned from their labels ("a photo of the digit three.", "a handwritten three.",
  ...); the other nine tenths are never seen, and zero-shot accuracy is measured on them (0.67,
  10-way). The backbone knows all ten names, loosely, as a real CLIP knows the classes of a
  base-to-novel split: the novel classes are new to the prompt, not to the backbone, and there is
  room for prompts to add (with half the images it reaches 0.97 zero-shot, and no prompt can).
  ``held_out_digits`` keeps whole classes out instead (their names then mean nothing to the text
  tower, so no prompt can reach them: every method is at chance on them).
- the easy-vqa train images, captioned from the shape and colour their questions and answers state
  ("a blue circle.", "a circle.", "a blue shape.", ...). The easy-vqa test images and every question
  are never seen: VQA runs on easy-vqa learn to answer questions the backbone was never given.

A batch holds many images of one caption, so the loss counts every caption that describes an image
as a positive for it (UniCL's multi-positive form of the CLIP loss): image i's target over the
batch's distinct captions is uniform over those whose attributes (digit; shape, colour) the image has,
and symmetrically for each caption over the images. Training is seeded (model init, order, captions,
shifts); the result is cached as an open_clip checkpoint (safetensors) beside its model config JSON
and a metadata file (recipe, data, zero-shot accuracies, build time) in
``$FEDPROMPT_CACHE_DIR/demo-clip/<recipe hash>`` (default ``~/.cache/fedprompt``), built under a file
lock, and then loaded like any pretrained CLIP through open_clip's ``pretrained=<file>`` path.
Same recipe, same library versions and thread count: the same weights, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedprompt.config import BUNDLED_WEIGHTS, OpenCLIPBackboneConfig
from fedprompt.data.images import (
    DEMO_PRETRAINING_FRACTION,
    DEMO_PRETRAINING_SEED,
    DIGIT_NAMES,
    digit_arrays,
    digit_pretraining_split,
)
from fedprompt.errors import DataError
from fedprompt.seeding import derive_seed, torch_generator
from prompt_modules.clip_backbone import OpenCLIPBackbone

log = logging.getLogger("fedprompt.demo_backbone")

DEMO_CLIP_ALIAS = "bundled:demo-clip"
DEMO_CLIP_NAME = "fedprompt-demo-clip"
CACHE_ENV = "FEDPROMPT_CACHE_DIR"
CHECKPOINT_FILE = "open_clip_model.safetensors"
METADATA_FILE = "demo-clip.json"
RECIPE_VERSION = 2
DEMO_CLIP_MODEL: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 4,
        "width": 128,
        "patch_size": 8,
        "head_width": 32,
        "pool_type": "avg",
        "final_ln_after_pool": True,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
DIGIT_TEMPLATES = (
    "a photo of the digit {digit}.",
    "a handwritten {digit}.",
    "the number {digit}.",
    "a picture of a {digit}.",
)
SHAPE_TEMPLATES = (
    "a {color} {shape}.",
    "a photo of a {color} {shape}.",
    "a {shape} that is {color}.",
    "a {shape}.",
    "a photo of a {shape}.",
    "a {color} shape.",
    "something {color}.",
)
ZERO_SHOT_TEMPLATES = {
    "digit": "a photo of the digit {}.",
    "shape": "a photo of a {}.",
    "color": "a {} shape.",
}

build_count = 0
"""How many times this process trained a demo backbone (a cache hit trains nothing)."""


@dataclass(frozen=True)
class DemoClipRecipe:
    """Everything the demo backbone's weights depend on; its hash names the cache folder."""

    seed: int = DEMO_PRETRAINING_SEED
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    init_logit_scale: float = math.log(1 / 0.07)
    """CLIP's initial temperature (1/0.07): with a scale near 1 the contrast is too soft to separate
    digits in this budget (recipe 1: zero-shot 0.13 on digits, shapes 0.38; this one: 0.67, 0.90)."""
    max_shift: int = 2
    held_out_digits: tuple[str, ...] = ()
    digit_image_fraction: float = DEMO_PRETRAINING_FRACTION
    max_digit_images: int | None = None
    max_shape_images: int | None = None
    max_eval_images: int | None = None
    model: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEMO_CLIP_MODEL)))

    def key(self) -> str:
        """A hash of the recipe and of the versions of what builds it (data packages, torch, open_clip)."""
        versions = {name: _version(name) for name in ("torch", "open_clip_torch", "scikit-learn", "easy-vqa")}
        text = json.dumps({"recipe": asdict(self), "version": RECIPE_VERSION, **versions}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_RECIPE = DemoClipRecipe()
"""The recipe of ``bundled:demo-clip``."""


@dataclass(frozen=True)
class DemoClip:
    """The demo backbone's files in the cache, what they hold, and whether this call trained them."""

    folder: Path
    metadata: dict[str, Any]
    built: bool

    @property
    def config_path(self) -> Path:
        return self.folder / f"{DEMO_CLIP_NAME}.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def note(self) -> str:
        """What every output that uses it says."""
        return self.metadata["note"]


def cache_root() -> Path:
    """``$FEDPROMPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedprompt``, else ``~/.cache/fedprompt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedprompt"


def demo_clip(recipe: DemoClipRecipe | None = None, cache_dir: Path | None = None) -> DemoClip:
    """The demo backbone of ``recipe``: read from the cache, or trained now (once, under a file lock
    that other processes wait on) and cached. Raises DataError when a data package is missing."""
    from filelock import FileLock

    recipe = recipe or DEFAULT_RECIPE
    root = (cache_dir or cache_root()) / "demo-clip"
    folder = root / recipe.key()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{folder.name}.lock")):
        if not (folder / METADATA_FILE).is_file():
            partial = root / f"{folder.name}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            _build(recipe, partial)
            shutil.rmtree(folder, ignore_errors=True)
            partial.replace(folder)  # atomic: a reader sees the whole folder or none
            return DemoClip(folder, _read_metadata(folder), built=True)
    return DemoClip(folder, _read_metadata(folder), built=False)


def resolve_clip_weights(config: OpenCLIPBackboneConfig) -> tuple[str, str | None]:
    """(open_clip model name or config file, pretrained tag or checkpoint file) for a backbone
    config: ``bundled:demo-clip`` becomes the cached demo checkpoint (built on first use) and its
    note is logged; other models pass through."""
    if config.model != DEMO_CLIP_ALIAS:
        return config.model, config.pretrained
    if config.pretrained != BUNDLED_WEIGHTS:
        log.warning(
            "backbone.pretrained %r is ignored: %s brings its own weights", config.pretrained, DEMO_CLIP_ALIAS
        )
    demo = demo_clip()
    log.warning("%s", demo.note)
    return str(demo.config_path), str(demo.checkpoint_path)


def backbone_notes(config: OpenCLIPBackboneConfig) -> dict[str, Any]:
    """What a run summary records about a demo backbone (nothing for other models)."""
    if config.model != DEMO_CLIP_ALIAS:
        return {}
    demo = demo_clip()
    keys = ("note", "trained_on", "zero_shot", "recipe_key")
    return {
        "backbone": {**{key: demo.metadata[key] for key in keys}, "checkpoint": str(demo.checkpoint_path)}
    }


def _version(distribution: str) -> str:
    try:
        return package_metadata.version(distribution)
    except package_metadata.PackageNotFoundError:
        return "absent"


def _read_metadata(folder: Path) -> dict[str, Any]:
    return json.loads((folder / METADATA_FILE).read_text())


# --------------------------------------------------------------------------- the pairs


@dataclass
class CaptionedImages:
    """Preprocessed images [N, 3, H, W], what each shows (its attributes: digit, or shape and colour),
    and the captions that may describe each kind."""

    pixels: torch.Tensor
    attributes: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.attributes)


def _digit_split(recipe: DemoClipRecipe) -> tuple[list[int], list[int], list[int]]:
    """Row indices of sklearn's digits: (pre-training rows, unseen rows of seen classes, rows of the
    held-out classes). The pre-training rows are a seeded ``digit_image_fraction`` of each seen class."""
    return digit_pretraining_split(
        recipe.seed, recipe.digit_image_fraction, recipe.held_out_digits, recipe.max_digit_images
    )


def _digit_images(rows: Sequence[int], backbone: OpenCLIPBackbone) -> CaptionedImages:
    from PIL import Image

    images, labels = digit_arrays()
    pixels = backbone.preprocess_images([Image.fromarray(images[row], mode="L") for row in rows])
    return CaptionedImages(pixels, [{"digit": DIGIT_NAMES[labels[row]]} for row in rows])


def _shape_images(split: str, limit: int | None, seed: int, backbone: OpenCLIPBackbone) -> CaptionedImages:
    from PIL import Image

    from fedprompt.data.easy_vqa import shape_images

    images = list(shape_images(split).values())
    if limit is not None and limit < len(images):
        rng = np.random.default_rng(derive_seed(seed, "demo-clip", "shape-images", split))
        images = [images[i] for i in np.sort(rng.choice(len(images), size=limit, replace=False))]
    pixels = backbone.preprocess_images([Image.open(image.path) for image in images])
    return CaptionedImages(pixels, [{"shape": image.shape, "color": image.color} for image in images])


def _captions() -> tuple[list[str], list[dict[str, str]]]:
    """Every caption the recipe can draw and the attributes each one states."""
    texts, stated = [], []
    for digit in DIGIT_NAMES:
        for template in DIGIT_TEMPLATES:
            texts.append(template.format(digit=digit))
            stated.append({"digit": digit})
    from fedprompt.data.easy_vqa import COLORS, SHAPES

    for shape in SHAPES:
        for color in COLORS:
            for template in SHAPE_TEMPLATES:
                texts.append(template.format(shape=shape, color=color))
                stated.append(
                    {k: v for k, v in (("shape", shape), ("color", color)) if "{" + k + "}" in template}
                )
    unique = dict(zip(texts, stated, strict=True))  # templates without a colour repeat across colours
    return list(unique), list(unique.values())


def _caption_choices(
    attributes: list[dict[str, str]], stated: list[dict[str, str]], rng: np.random.Generator
) -> np.ndarray:
    """For each image, one caption drawn uniformly among those that describe it fully by a template."""
    by_image: dict[tuple, list[int]] = {}
    for i, facts in enumerate(stated):
        by_image.setdefault(tuple(sorted(facts.items())), []).append(i)
    choices = np.empty(len(attributes), dtype=np.int64)
    for row, facts in enumerate(attributes):
        options = [i for key in _subsets(facts) for i in by_image.get(key, [])]
        choices[row] = options[int(rng.integers(len(options)))]
    return choices


def _subsets(facts: dict[str, str]) -> list[tuple]:
    items = sorted(facts.items())
    subsets = [tuple(items)]
    if len(items) == 2:
        subsets += [(items[0],), (items[1],)]
    return subsets


# --------------------------------------------------------------------------- training


def _build(recipe: DemoClipRecipe, folder: Path) -> None:
    """Train the demo backbone of ``recipe`` and write its config, checkpoint and metadata to ``folder``."""
    global build_count
    from safetensors.torch import save_file

    build_count += 1
    start = time.perf_counter()
    config_path = folder / f"{DEMO_CLIP_NAME}.json"
    config_path.write_text(json.dumps(recipe.model, indent=2))
    backbone = OpenCLIPBackbone.load(
        str(config_path), None, seed=derive_seed(recipe.seed, "demo-clip", "init")
    )
    try:
        seen_rows, unseen_rows, held_rows = _digit_split(recipe)
        digits = _digit_images(seen_rows, backbone)
        shapes = _shape_images("train", recipe.max_shape_images, recipe.seed, backbone)
    except ModuleNotFoundError as exc:
        raise DataError(
            f"the demo backbone is pre-trained on scikit-learn's digits and easy-vqa's images: {exc}; "
            "pip install scikit-learn easy-vqa"
        ) from exc
    data = CaptionedImages(torch.cat([digits.pixels, shapes.pixels]), digits.attributes + shapes.attributes)
    log.warning(
        "building the demo backbone %s: %d digit and %d easy-vqa images, %d epochs (once; cached in %s)",
        DEMO_CLIP_ALIAS,
        len(digits),
        len(shapes),
        recipe.epochs,
        folder.parent,
    )
    losses = _train(backbone, data, recipe)
    model = backbone.model.eval().requires_grad_(False)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(
        state, str(folder / CHECKPOINT_FILE), metadata={"fedprompt": "demo backbone; see demo-clip.json"}
    )
    seconds = time.perf_counter() - start
    zero_shot = _zero_shot(backbone, recipe, unseen_rows, held_rows)
    parameters = sum(t.numel() for t in model.parameters())
    seen_names = [n for n in DIGIT_NAMES if n not in recipe.held_out_digits]
    held_out = f" (never {', '.join(recipe.held_out_digits)})" if recipe.held_out_digits else ""
    note = (
        f"{DEMO_CLIP_ALIAS} is a DEMO backbone, not a real CLIP: a {parameters / 1e6:.1f}M-parameter "
        f"open_clip model pre-trained contrastively on this machine on {len(digits)} scikit-learn digit "
        f"images of {seen_names[0]}..{seen_names[-1]}{held_out} and {len(shapes)} easy-vqa train "
        "images, with captions made from their labels and the shapes and colours their questions and "
        "answers state. Its numbers show what prompts do on it, not on a real CLIP."
    )
    metadata = {
        "note": note,
        "alias": DEMO_CLIP_ALIAS,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "trained_on": {
            "digits": {
                "images": len(digits),
                "classes": seen_names,
                "held_out_classes": list(recipe.held_out_digits),
            },
            "easy_vqa": {"images": len(shapes), "split": "train"},
        },
        "parameters": parameters,
        "build_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": losses[-1] if losses else None,
        "zero_shot": zero_shot,
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def _train(backbone: OpenCLIPBackbone, data: CaptionedImages, recipe: DemoClipRecipe) -> list[float]:
    """CLIP's contrastive training of both towers: AdamW (weight decay on matrices, not on norms,
    biases and the scale), warmup then a cosine learning rate. The token embedding takes sparse
    gradients and SparseAdam: the captions use a few dozen of its 49,408 rows, and a dense Adam step
    over all of them would cost more than the rest of the step."""
    model = backbone.model.train().requires_grad_(True)
    with torch.no_grad():
        model.logit_scale.fill_(recipe.init_logit_scale)
    embedding = model.token_embedding
    named = [(n, p) for n, p in model.named_parameters() if p is not embedding.weight]
    decay = [p for n, p in named if p.ndim >= 2 and "ln" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "ln" not in n)]
    dense = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        foreach=True,
    )
    sparse = torch.optim.SparseAdam([embedding.weight], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    embedding.sparse = True
    try:
        return _steps(backbone, data, recipe, (dense, sparse))
    finally:
        embedding.sparse = False


def _steps(
    backbone: OpenCLIPBackbone,
    data: CaptionedImages,
    recipe: DemoClipRecipe,
    optimizers: tuple[torch.optim.Optimizer, ...],
) -> list[float]:
    """The training loop: seeded order, captions and shifts; one loss value per step."""
    model = backbone.model
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    total = max(1, recipe.epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return recipe.lr * (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))

    captions, stated = _captions()
    caption_ids = backbone.tokenize(captions)
    rng = np.random.default_rng(derive_seed(recipe.seed, "demo-clip", "captions"))
    generator = torch_generator(derive_seed(recipe.seed, "demo-clip", "order"))
    image_facts = [set(facts.items()) for facts in data.attributes]
    losses, step, start = [], 0, time.perf_counter()
    for epoch in range(recipe.epochs):
        choices = _caption_choices(data.attributes, stated, rng)
        order = torch.randperm(len(data), generator=generator)
        for begin in range(0, len(data), recipe.batch_size):
            rows = order[begin : begin + recipe.batch_size]
            used = sorted(set(choices[rows.numpy()].tolist()))
            positives = torch.tensor(
                [[set(stated[c].items()) <= image_facts[int(r)] for c in used] for r in rows],
                dtype=torch.float32,
            )
            pixels = _shifted(data.pixels[rows], recipe.max_shift, generator)
            ids = caption_ids[used]
            image = F.normalize(backbone.encode_image(pixels), dim=-1)
            text = F.normalize(backbone.text_features(backbone.token_embeddings(ids), ids), dim=-1)
            logits = model.logit_scale.exp() * image @ text.T
            loss = (_soft_cross_entropy(logits, positives) + _soft_cross_entropy(logits.T, positives.T)) / 2
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        log.info(
            "demo backbone: epoch %d/%d, loss %.3f, %.0f s",
            epoch + 1,
            recipe.epochs,
            losses[-1],
            time.perf_counter() - start,
        )
    return losses


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against the uniform distribution over its positive columns."""
    targets = positives / positives.sum(1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def _shifted(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by a random whole-pixel shift of up to ``max_shift`` (edges replicated)."""
    if max_shift == 0:
        return pixels
    size = pixels.shape[-1]
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(pixels), 2), generator=generator)
    return torch.stack(
        [padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())]
    )


# --------------------------------------------------------------------------- zero-shot check


@torch.no_grad()
def _zero_shot(
    backbone: OpenCLIPBackbone, recipe: DemoClipRecipe, unseen_rows: list[int], held_rows: list[int]
) -> dict[str, float]:
    """Zero-shot accuracy on what pre-training never showed: digits of seen classes (unseen images)
    and of the held-out classes, among all ten names and (held-out) among the held-out names; the
    easy-vqa test images' shape (3 names) and colour (8 names). ``max_eval_images`` caps each set."""
    from fedprompt.data.easy_vqa import COLORS, SHAPES

    def accuracy(images: CaptionedImages, kind: str, names: Sequence[str]) -> float:
        text = F.normalize(backbone.encode_text([ZERO_SHOT_TEMPLATES[kind].format(n) for n in names]), dim=-1)
        image = F.normalize(backbone.encode_image(images.pixels), dim=-1)
        predicted = (image @ text.T).argmax(1).tolist()
        return float(
            np.mean([names[p] == facts[kind] for p, facts in zip(predicted, images.attributes, strict=True)])
        )

    rng = np.random.default_rng(derive_seed(recipe.seed, "demo-clip", "zero-shot"))
    limit = recipe.max_eval_images
    if limit is not None:
        unseen_rows = sorted(rng.permutation(unseen_rows)[:limit].tolist())
        held_rows = sorted(rng.permutation(held_rows)[:limit].tolist())
    results: dict[str, float] = {}
    if unseen_rows:
        results["digits_seen_classes_10way"] = accuracy(
            _digit_images(unseen_rows, backbone), "digit", DIGIT_NAMES
        )
    if held_rows:
        held = _digit_images(held_rows, backbone)
        results["digits_held_out_classes_10way"] = accuracy(held, "digit", DIGIT_NAMES)
        results["digits_held_out_classes_among_held_out"] = accuracy(held, "digit", recipe.held_out_digits)
    shapes = _shape_images("test", limit, recipe.seed, backbone)
    results["easy_vqa_test_shape"] = accuracy(shapes, "shape", SHAPES)
    results["easy_vqa_test_color"] = accuracy(shapes, "color", list(COLORS))
    return {key: round(value, 4) for key, value in results.items()}
