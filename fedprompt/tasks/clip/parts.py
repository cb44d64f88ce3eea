"""What the CLIP tasks (image classification, visual question answering) build alike: the
frozen backbone, the CoOp text context and the visual prompt of a configuration section, each
part's optimiser settings, and the image side's input of every image, encoded once and cached."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import open_clip
import torch

from fedprompt.config import (
    ConfigError,
    CoOpPromptConfig,
    OpenCLIPBackboneConfig,
    PartOptimizerConfig,
    PixelPromptConfig,
    VPTPromptConfig,
)
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.clip.demo_backbone import resolve_clip_weights
from fedprompt.tasks.clip.feature_cache import FeatureCache, image_fingerprint
from fedprompt.tasks.preflight import context_phrase, vpt_layers
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import TextContext
from prompt_modules.clip_vqa import CLIPVQAModel
from prompt_modules.domain_prompts import AdaptivePromptClassifier, DualPromptClassifier
from prompt_modules.soft_prompt import init_prompt_embeddings
from prompt_modules.visual_prompts import PixelPrompt, VisualTokenPrompt, vpt_init

ClipModel = CLIPPromptClassifier | AdaptivePromptClassifier | DualPromptClassifier | CLIPVQAModel
"""The CLIP prompt modules whose image side reads cached inputs (``image_input``, ``prepare_images``)."""


def load_clip_backbone(config: OpenCLIPBackboneConfig, seed: int) -> OpenCLIPBackbone:
    """The frozen CLIP a run needs (seeded random weights when ``pretrained`` is null; the demo
    backbone's cached checkpoint, built on first use, for ``bundled:demo-clip``)."""
    model, pretrained = resolve_clip_weights(config)
    return OpenCLIPBackbone.load(
        model,
        pretrained,
        precision=config.precision,
        image_size=config.image_size,
        seed=derive_seed(seed, "random-backbone"),
    )


def build_text_context(
    config: CoOpPromptConfig, backbone: OpenCLIPBackbone, class_names: Sequence[str], seed: int, field: str
) -> TextContext:
    """CoOp context: from a phrase (one vector per token), sampled vocabulary or N(0, init_std²);
    deep layers N(0, init_std²)."""
    if config.depth > backbone.num_text_layers:
        raise ConfigError(
            f"{field}.depth: {config.depth} exceeds the text tower's {backbone.num_text_layers} layers"
        )
    generator = torch_generator(derive_seed(seed, "prompt-init", "text"))
    init = _context_init(config, backbone, generator, field)
    context = torch.stack([init() for _ in class_names]) if config.class_specific else init()
    deep = torch.randn(config.depth - 1, context.shape[-2], backbone.text_width, generator=generator)
    return TextContext(
        context,
        deep * config.init_std if config.depth > 1 else None,
        class_names if config.class_specific else None,
        class_position=config.class_position,
    )


def build_domain_contexts(
    config: CoOpPromptConfig, backbone: OpenCLIPBackbone, count: int, seed: int, field: str
) -> torch.Tensor:
    """``count`` CoOp contexts [count, M, d], each drawn as ``build_text_context`` draws one (all the
    phrase's embeddings with ``init: text``), one after the other from one seeded generator."""
    init = _context_init(
        config, backbone, torch_generator(derive_seed(seed, "prompt-init", "domains")), field
    )
    return torch.stack([init() for _ in range(count)])


def _context_init(
    config: CoOpPromptConfig, backbone: OpenCLIPBackbone, generator: torch.Generator, field: str
) -> Callable[[], torch.Tensor]:
    """A function drawing one context [M, d] as ``config`` says, from ``generator``."""
    num_tokens, phrase = context_phrase(config, backbone.tokenizer, field)

    def init() -> torch.Tensor:
        return init_prompt_embeddings(
            backbone.token_embedding_matrix,
            num_tokens,
            config.init,
            generator=generator,
            text_ids=phrase,
            excluded_ids=backbone.special_token_ids,
            std=config.init_std,
        )

    return init


def build_visual_side(
    config: VPTPromptConfig | PixelPromptConfig, backbone: OpenCLIPBackbone, seed: int, field: str
) -> VisualTokenPrompt | PixelPrompt:
    """A pixel prompt or VPT tokens (layers checked against the tower), seeded from the run seed."""
    if isinstance(config, PixelPromptConfig):
        try:
            return PixelPrompt(
                config.method,
                config.size,
                backbone.image_size,
                config.init_std,
                derive_seed(seed, "pixel"),
                random_at_eval=config.random_at_eval,
            )
        except ValueError as exc:
            raise ConfigError(f"{field}.size: {exc}") from None
    layers = vpt_layers(config, backbone.num_vision_layers, field)
    generator = torch_generator(derive_seed(seed, "prompt-init", "vpt"))
    return VisualTokenPrompt(
        vpt_init(backbone, layers, config.num_tokens, generator),
        config.start_layer,
        placement=config.placement,
        dropout=config.dropout,
    )


def part_settings(config: PartOptimizerConfig) -> dict[str, float]:
    return {name: value for name, value in config.model_dump().items() if value is not None}


def encoded_images(
    model: ClipModel, images: datasets.Dataset, cache: FeatureCache, batch_size: int
) -> torch.Tensor:
    """What the model's image side reads for each image of ``images`` [N, ...] (features, hidden
    states below the first prompted layer, or pixels), computed once in batches and cached (pixels in
    memory only: cheap to redo)."""
    backbone: OpenCLIPBackbone = model.backbone

    def compute() -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = backbone.preprocess_images(images[start : start + batch_size]["image"])
            chunks.append(model.prepare_images(pixels.to(backbone.device)).cpu())
        return torch.cat(chunks)

    key = model.image_input.key
    return cache.get(image_cache_key(model, images, model.image_input.name), compute, persist=key != "pixels")


def image_cache_key(model: ClipModel, dataset: datasets.Dataset, what: str) -> dict[str, str]:
    """What cached image tensors depend on: model, weights, precision, transform, images, ``what``."""
    backbone: OpenCLIPBackbone = model.backbone
    return {
        "model": backbone.name,
        "architecture": repr(open_clip.get_model_config(backbone.name)),
        "weights": backbone.weights,
        "dtype": f"{backbone.dtype}/{backbone.image_dtype}",
        "transform": repr(backbone.preprocess),
        "input": what,
        "images": image_fingerprint(dataset),
    }
