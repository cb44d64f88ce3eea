"""Image classification with prompts on a frozen open_clip CLIP: config -> backbone, module, clients.

The sibling of ``text_task``. Images are preprocessed with the backbone's own transform and turned,
once per dataset, into what the prompt module's image side reads (``ImageInput``): CLIP image
features for text-side prompts, hidden states below the first prompted layer for VPT, pixels for
pixel-space prompts. Those tensors go through ``FeatureCache`` (in memory; on disk when
``backbone.feature_cache_dir`` is set).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import datasets
import numpy as np
import open_clip
import torch

from fedprompt.batching import TensorData
from fedprompt.client import Client
from fedprompt.config import (
    ConfigError,
    CoOpPromptConfig,
    GeneratorPromptConfig,
    OpenCLIPBackboneConfig,
    PartOptimizerConfig,
    PixelPromptConfig,
    RunConfig,
    TwinPromptConfig,
    VPTPromptConfig,
)
from fedprompt.contrastive import ContrastiveTrainer
from fedprompt.data import partition_indices, split_local
from fedprompt.data.images import load_image_classification, split_base_novel
from fedprompt.demo_backbone import backbone_notes, resolve_clip_weights
from fedprompt.device import make_accelerator
from fedprompt.experiment import EvalSet, Experiment
from fedprompt.feature_cache import FeatureCache, image_fingerprint
from fedprompt.preflight import check_coupled_depth, vpt_layers
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.strategies import build_strategy
from fedprompt.training import GradientTrainer, LocalTrainer, gradient_optimizer
from optimizers.gradient import GradientOptimizer
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import FixedClassText, TextContext
from prompt_modules.prompt_generator import PromptGenerator
from prompt_modules.soft_prompt import init_prompt_embeddings
from prompt_modules.twin_prompt import CoupledVisualPrompt
from prompt_modules.visual_prompts import FrozenImage, PixelPrompt, VisualTokenPrompt, vpt_init


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


# --------------------------------------------------------------------------- prompt modules


def build_text_context(
    config: CoOpPromptConfig, backbone: OpenCLIPBackbone, class_names: Sequence[str], seed: int, field: str
) -> TextContext:
    """CoOp context: from a phrase, sampled vocabulary or N(0, init_std²); deep layers N(0, init_std²)."""
    if config.depth > backbone.num_text_layers:
        raise ConfigError(
            f"{field}.depth: {config.depth} exceeds the text tower's {backbone.num_text_layers} layers"
        )
    generator = torch_generator(derive_seed(seed, "prompt-init", "text"))
    phrase: list[int] = []
    if config.init_text:
        ids = backbone.tokenize([config.init_text])[0]
        first = 1 if int(ids[0]) in backbone.special_token_ids else 0
        phrase = ids[first : int(backbone.pooled_positions(ids[None])[0])].tolist()

    def init() -> torch.Tensor:
        return init_prompt_embeddings(
            backbone.token_embedding_matrix,
            config.num_tokens,
            config.init,
            generator=generator,
            text_ids=phrase,
            excluded_ids=backbone.special_token_ids,
            std=config.init_std,
        )

    context = torch.stack([init() for _ in class_names]) if config.class_specific else init()
    deep = torch.randn(config.depth - 1, config.num_tokens, backbone.text_width, generator=generator)
    return TextContext(
        context,
        deep * config.init_std if config.depth > 1 else None,
        class_names if config.class_specific else None,
    )


def build_visual_side(
    config: VPTPromptConfig | PixelPromptConfig, backbone: OpenCLIPBackbone, seed: int, field: str
) -> VisualTokenPrompt | PixelPrompt:
    """A pixel prompt or VPT tokens (layers checked against the tower), seeded from the run seed."""
    if isinstance(config, PixelPromptConfig):
        try:
            return PixelPrompt(
                config.method, config.size, backbone.image_size, config.init_std, derive_seed(seed, "pixel")
            )
        except ValueError as exc:
            raise ConfigError(f"{field}.size: {exc}") from None
    layers = vpt_layers(config, backbone.num_vision_layers, field)
    generator = torch_generator(derive_seed(seed, "prompt-init", "vpt"))
    return VisualTokenPrompt(vpt_init(backbone, layers, config.num_tokens, generator), config.start_layer)


def _part_settings(config: PartOptimizerConfig) -> dict[str, float]:
    return {name: value for name, value in config.model_dump().items() if value is not None}


def build_clip_model(
    config: RunConfig, backbone: OpenCLIPBackbone, class_names: Sequence[str]
) -> CLIPPromptClassifier:
    """The prompt module the config asks for, on ``backbone``, scoring ``class_names``."""
    prompt, seed = config.prompt, config.seed
    if isinstance(prompt, CoOpPromptConfig):
        text = build_text_context(prompt, backbone, class_names, seed, "prompt")
        return CLIPPromptClassifier(backbone, text, FrozenImage(), class_names)
    if isinstance(prompt, VPTPromptConfig | PixelPromptConfig):
        image = build_visual_side(prompt, backbone, seed, "prompt")
        return CLIPPromptClassifier(backbone, FixedClassText(prompt.class_template), image, class_names)
    if isinstance(prompt, GeneratorPromptConfig):
        generator = PromptGenerator(
            prompt.num_tokens,
            backbone.text_width,
            backbone.embed_dim,
            heads=prompt.heads,
            ff_mult=prompt.ff_mult,
            self_attention_layers=prompt.self_attention_layers,
            template=prompt.name_template,
            init_std=prompt.init_std,
            seed=derive_seed(seed, "prompt-init", "generator"),
        )
        return CLIPPromptClassifier(backbone, generator, FrozenImage(), class_names)
    if isinstance(prompt, TwinPromptConfig):
        text = build_text_context(prompt.text, backbone, class_names, seed, "prompt.text")
        if prompt.coupled:
            assert isinstance(prompt.visual, VPTPromptConfig)  # TwinPromptConfig guarantees it
            layers = vpt_layers(prompt.visual, backbone.num_vision_layers, "prompt.visual")
            check_coupled_depth(prompt.visual.start_layer, layers, text.depth)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "prompt-init", "coupling"))
                image = CoupledVisualPrompt(
                    backbone.text_width, backbone.vision_width, layers, prompt.visual.start_layer
                )
        else:
            image = build_visual_side(prompt.visual, backbone, seed, "prompt.visual")
        settings = {
            "text": _part_settings(prompt.text_optimizer),
            "image": _part_settings(prompt.visual_optimizer),
        }
        return CLIPPromptClassifier(backbone, text, image, class_names, settings)
    raise ConfigError(f"prompt.kind {prompt.kind!r} is not a CLIP prompt")


# --------------------------------------------------------------------------- data


def image_tensors(
    model: CLIPPromptClassifier,
    dataset: datasets.Dataset,
    cache: FeatureCache,
    batch_size: int,
) -> TensorData:
    """The dataset as the model's image input (cached, computed once) plus ``labels``."""
    backbone: OpenCLIPBackbone = model.backbone
    image_input = model.image_input
    parts = {
        "model": backbone.name,
        "architecture": repr(open_clip.get_model_config(backbone.name)),
        "weights": backbone.weights,
        "dtype": f"{backbone.dtype}/{backbone.image_dtype}",
        "transform": repr(backbone.preprocess),
        "input": image_input.name,
        "images": image_fingerprint(dataset),
    }

    def compute() -> torch.Tensor:
        chunks = []
        for start in range(0, len(dataset), batch_size):
            images = dataset[start : start + batch_size]["image"]
            pixels = torch.stack([backbone.preprocess(image.convert("RGB")) for image in images])
            chunks.append(model.prepare_images(pixels.to(backbone.device)).cpu())
        return torch.cat(chunks)

    values = cache.get(parts, compute, persist=image_input.key != "pixels")  # pixels: memory only
    labels = torch.tensor(dataset["label"], dtype=torch.long)
    return TensorData({image_input.key: values, "labels": labels})


# --------------------------------------------------------------------------- experiment


def _trainer(config: RunConfig, optimizer: GradientOptimizer, device: torch.device) -> LocalTrainer:
    prompt, batch_size = config.prompt, config.optimizer.batch_size
    if isinstance(prompt, TwinPromptConfig) and prompt.contrastive:
        return ContrastiveTrainer(
            optimizer,
            batch_size,
            device,
            ce_weight=prompt.ce_weight,
            temperature=prompt.temperature,
            eval_batch_size=config.runtime.eval_batch_size,
        )
    return GradientTrainer(optimizer, batch_size, device)


def build_vision_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Load images and CLIP, build the prompt module, encode images once, partition, make the clients."""
    assert isinstance(config.backbone, OpenCLIPBackboneConfig)  # experiment.py dispatches on the kind
    accelerator = make_accelerator(config.runtime)
    data = load_image_classification(config.data, seed=derive_seed(config.seed, "data"))
    backbone = load_clip_backbone(config.backbone, config.seed).to(accelerator.device)
    eval_sets: dict[str, EvalSet] = {}
    train_split, test_split, class_names = data.train, data.test, data.label_names
    if config.data.novel_class_fraction is not None:
        split = split_base_novel(data, config.data.novel_class_fraction)
        train_split, test_split, class_names = split.train, split.base_test, split.base_names
    model = build_clip_model(config, backbone, class_names)
    model.to(accelerator.device).eval()

    labels = np.asarray(train_split["label"], dtype=np.int64)
    parts = partition_indices(labels, config.partition, seed=derive_seed(config.seed, "partition"))
    built = [cid for cid in range(len(parts)) if client_ids is None or cid in client_ids]
    # encode only the built clients' images (a Flower SuperNode hosts one client of many)
    needed = np.unique(np.concatenate([parts[cid] for cid in built] or [np.zeros(0, np.int64)]))
    cache = FeatureCache(config.backbone.feature_cache_dir)
    batch = config.runtime.eval_batch_size
    subset = train_split if len(needed) == len(train_split) else train_split.select(needed)
    # a process with no clients (a Flower ServerApp) encodes no training images at all
    train = image_tensors(model, subset, cache, batch) if built else None
    test = image_tensors(model, test_split, cache, batch)
    if config.data.novel_class_fraction is not None:
        eval_sets["base"] = EvalSet(test, list(split.base_names))
        eval_sets["novel"] = EvalSet(
            image_tensors(model, split.novel_test, cache, batch), list(split.novel_names)
        )

    optimizer = gradient_optimizer(config.optimizer, accelerator)
    clients = {}
    for cid in built:
        local_train, local_val = split_local(
            np.searchsorted(needed, parts[cid]),  # positions in the encoded subset, in the same order
            config.partition.local_val_fraction,
            seed=derive_seed(config.seed, "local-split", cid),
        )
        clients[cid] = Client(
            cid,
            train.subset(local_train),
            train.subset(local_val) if len(local_val) else None,
            model,
            _trainer(config, optimizer, accelerator.device),  # one per client: ATPFL keeps client state in it
            eval_batch_size=config.runtime.eval_batch_size,
        )
    return Experiment(
        model=model,
        clients=clients,
        test_data=test,
        strategy=build_strategy(config.strategy),
        device=accelerator.device,
        backbone_bytes=backbone.num_bytes(),
        label_names=list(class_names),
        eval_sets=eval_sets,
        notes=backbone_notes(config.backbone),
    )
