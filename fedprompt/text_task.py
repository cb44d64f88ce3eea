"""Text classification with a soft prompt on a frozen HF model: config -> backbone, module, clients."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from accelerate import Accelerator

from fedprompt.batching import TensorData
from fedprompt.blackbox import build_blackbox_trainer, projection_spec, search_sigma
from fedprompt.client import Client
from fedprompt.config import (
    CMAESOptimizerConfig,
    ConfigError,
    DeepPromptConfig,
    HFTextBackboneConfig,
    IntrinsicPromptConfig,
    RemoteBackboneConfig,
    RunConfig,
    SimilarityHeadConfig,
    SoftPromptConfig,
    SPSAOptimizerConfig,
    VerbalizerHeadConfig,
)
from fedprompt.data import load_text_classification, partition_indices, split_local
from fedprompt.device import make_accelerator
from fedprompt.experiment import Experiment
from fedprompt.preflight import check_deep_start_layer
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.strategies import build_strategy
from fedprompt.training import GradientTrainer, LocalTrainer, gradient_optimizer, round_schedule
from prompt_modules.heads import HeadSpec, SimilarityHeadSpec, VerbalizerHeadSpec
from prompt_modules.heads import build_head as build_head_from_spec
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier
from prompt_modules.soft_prompt import DeepPrompt, SoftPrompt, init_prompt_embeddings
from prompt_modules.text_classifier import SimilarityHead, TextPromptClassifier, VerbalizerHead


def load_backbone(config: HFTextBackboneConfig, head_kind: str, seed: int) -> HFTextBackbone:
    """The frozen backbone a text run needs (with an LM head for verbalisers)."""
    return HFTextBackbone.load(
        config.model,
        head="lm" if head_kind == "verbalizer" else "none",
        gguf_file=config.gguf_file,
        revision=config.revision,
        random_config=config.random_config,
        tokenizer=config.tokenizer,
        dtype=config.dtype,
        max_length=config.max_length,
        seed=derive_seed(seed, "random-backbone"),
    )


def build_head(
    config: SimilarityHeadConfig | VerbalizerHeadConfig, backbone: HFTextBackbone, label_names: Sequence[str]
) -> SimilarityHead | VerbalizerHead:
    """The class head: encoded label descriptions, or label words of the LM head."""
    return build_head_from_spec(backbone, head_spec(config, label_names))


def head_spec(config: SimilarityHeadConfig | VerbalizerHeadConfig, label_names: Sequence[str]) -> HeadSpec:
    """The head as plain data (each class's description or label words), for a local or remote backbone."""
    if isinstance(config, SimilarityHeadConfig):
        given = config.label_descriptions or {}
        _check_known_labels("head.label_descriptions", given, label_names)
        descriptions = [
            given.get(name, config.description_template.format(label=name)) for name in label_names
        ]
        return SimilarityHeadSpec(
            descriptions=tuple(descriptions), temperature=config.temperature, pooling=config.pooling
        )
    given_words = config.label_words or {}
    _check_known_labels("head.label_words", given_words, label_names)
    return VerbalizerHeadSpec(label_words=tuple(tuple(given_words.get(name, [name])) for name in label_names))


def build_prompt(
    config: SoftPromptConfig | DeepPromptConfig | IntrinsicPromptConfig,
    backbone: HFTextBackbone,
    seed: int,
    sigma: float = 1.0,
) -> SoftPrompt | DeepPrompt | IntrinsicPrompt:
    """The trainable prompt, initialised from text, sampled vocabulary or noise (seeded); or an
    intrinsic prompt z = 0 on the projection the run seed fixes (``sigma``: BBT's σ in its scale)."""
    if isinstance(config, IntrinsicPromptConfig):
        return IntrinsicPrompt.from_backbone(backbone, projection_spec(config, seed, sigma))
    generator = torch_generator(derive_seed(seed, "prompt-init"))
    text_ids = (
        backbone.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if config.init_text
        else []
    )

    def init() -> torch.Tensor:
        return init_prompt_embeddings(
            backbone.embedding_matrix,
            config.num_tokens,
            config.init,
            generator=generator,
            text_ids=text_ids,
            excluded_ids=backbone.tokenizer.all_special_ids,
            std=config.init_std,
        )

    if isinstance(config, SoftPromptConfig):
        return SoftPrompt(init())
    check_deep_start_layer(config.start_layer, backbone.num_layers)
    layers = backbone.num_layers - config.start_layer
    return DeepPrompt(torch.stack([init() for _ in range(layers)]), config.start_layer)


def build_text_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Load data and backbone, build the prompt module, tokenise once, partition, make the clients."""
    accelerator = make_accelerator(config.runtime)
    data = load_text_classification(config.data, seed=derive_seed(config.seed, "data"))
    if isinstance(config.backbone, RemoteBackboneConfig):
        from fedprompt.remote_task import build_remote_model

        model, backbone_bytes = build_remote_model(config, config.backbone, data.label_names)
    else:
        model, backbone_bytes = _local_model(config, config.backbone, data.label_names, accelerator.device)
    model.to(accelerator.device).eval()

    def tensors(dataset) -> TensorData:
        encoded = model.encode_texts(dataset["text"])
        return TensorData({**encoded, "labels": torch.tensor(dataset["label"], dtype=torch.long)})

    train, test = tensors(data.train), tensors(data.test)
    parts = partition_indices(
        train.labels.numpy(), config.partition, seed=derive_seed(config.seed, "partition")
    )
    trainer = _trainer(config, accelerator)
    clients = {}
    for cid, indices in enumerate(parts):
        if client_ids is not None and cid not in client_ids:
            continue
        local_train, local_val = split_local(
            indices, config.partition.local_val_fraction, seed=derive_seed(config.seed, "local-split", cid)
        )
        clients[cid] = Client(
            cid,
            train.subset(local_train),
            train.subset(local_val) if len(local_val) else None,
            model,
            trainer,
            eval_batch_size=config.runtime.eval_batch_size,
        )
    return Experiment(
        model=model,
        clients=clients,
        test_data=test,
        strategy=build_strategy(config.strategy, search_sigma(config.optimizer), run=config),
        device=accelerator.device,
        backbone_bytes=backbone_bytes,
        label_names=list(data.label_names),
    )


def _local_model(
    config: RunConfig, backbone_config: HFTextBackboneConfig, label_names: Sequence[str], device: torch.device
) -> tuple[TextPromptClassifier, int]:
    """The prompt module on a backbone loaded in this process, and the backbone's size in bytes."""
    backbone = load_backbone(backbone_config, config.head.kind, config.seed).to(device)
    head = build_head(config.head, backbone, label_names)
    prompt = build_prompt(config.prompt, backbone, config.seed, search_sigma(config.optimizer))
    if not isinstance(prompt, IntrinsicPrompt):
        return TextPromptClassifier(backbone, prompt, head, config.head.template), backbone.num_bytes()
    opt = config.optimizer
    chunk = opt.chunk_size if isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig) else 1
    return IntrinsicTextClassifier(backbone, prompt, head, config.head.template, chunk), backbone.num_bytes()


def _trainer(config: RunConfig, accelerator: Accelerator) -> LocalTrainer:
    """The local trainer the optimizer section describes: by gradient, or black-box over z."""
    opt = config.optimizer
    if isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig):
        return build_blackbox_trainer(opt, config.strategy, accelerator.device)
    return GradientTrainer(
        gradient_optimizer(opt, accelerator),
        batch_size=opt.batch_size,
        device=accelerator.device,
        schedule=round_schedule(opt, config.federation.rounds),
    )


def _check_known_labels(field: str, given: dict, label_names: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(label_names))
    if unknown:
        raise ConfigError(
            f"{field}: labels {unknown} are not in the data; its labels are {list(label_names)}"
        )
