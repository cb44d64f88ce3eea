"""Text classification with a soft prompt on a frozen HF model: config -> backbone, module, clients."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

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
from fedprompt.strategies.fedkseed import kseed_setup
from fedprompt.training import GradientTrainer, LocalTrainer, gradient_optimizer, round_schedule
from prompt_modules.heads import HeadSpec, SimilarityHeadSpec, VerbalizerHeadSpec
from prompt_modules.heads import build_head as build_head_from_spec
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier
from prompt_modules.soft_prompt import (
    DeepPrompt,
    PrefixPrompt,
    SoftPrompt,
    init_prompt_embeddings,
    init_token_ids,
)
from prompt_modules.text_classifier import (
    LAYER_INPUT,
    SimilarityHead,
    TextPromptClassifier,
    VerbalizerHead,
)


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
) -> SoftPrompt | DeepPrompt | PrefixPrompt | IntrinsicPrompt:
    """The trainable prompt, initialised from text, sampled vocabulary or noise (seeded); or an
    intrinsic prompt z = 0 on the projection the run seed fixes (``sigma``: BBT's σ in its scale).
    A key/value prefix starts at the frozen model's keys and values of the text's or sampled
    tokens, or at N(0, init_std²) entries."""
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
    if config.mode == "prefix":
        return PrefixPrompt(_prefix_init(config, backbone, generator, text_ids), config.start_layer)
    layers = backbone.num_layers - config.start_layer
    return DeepPrompt(torch.stack([init() for _ in range(layers)]), config.start_layer)


def _prefix_init(
    config: DeepPromptConfig, backbone: HFTextBackbone, generator: torch.Generator, text_ids: list[int]
) -> torch.Tensor:
    """Starting key/value prefixes [layers from start_layer, 2, kv_heads, m, head_dim] (fp32, CPU):
    the frozen model's keys and values of m tokens (init text/vocab), or N(0, init_std²) entries
    (random; the shape read from the keys of m arbitrary tokens)."""
    if config.init == "random":
        ids = torch.full((config.num_tokens,), backbone.tokenizer.pad_token_id)
    else:
        ids = init_token_ids(
            backbone.embedding_matrix.shape[0],
            config.num_tokens,
            config.init,
            generator=generator,
            text_ids=text_ids,
            excluded_ids=backbone.tokenizer.all_special_ids,
        )
    own = backbone.key_values(ids)[config.start_layer :].float().cpu()
    if config.init == "random":
        return torch.randn(own.shape, generator=generator) * config.init_std
    return own


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

    cache_layer = _cached_layer(config, model)

    def tensors(dataset) -> TensorData:
        encoded = model.encode_texts(dataset["text"])
        if cache_layer:
            encoded[LAYER_INPUT] = _layer_inputs(
                model, encoded, config.runtime.eval_batch_size, accelerator.device
            )
        return TensorData({**encoded, "labels": torch.tensor(dataset["label"], dtype=torch.long)})

    with _checked_against_the_model("head.template"):
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
        strategy=build_strategy(
            config.strategy, search_sigma(config.optimizer), kseed_setup(config), run=config
        ),
        device=accelerator.device,
        backbone_bytes=backbone_bytes,
        label_names=list(data.label_names),
    )


def _cached_layer(config: RunConfig, model: object) -> int:
    """The deep prompt's first layer when the states entering it are to be cached, else 0."""
    prompt = config.prompt
    if not (isinstance(prompt, DeepPromptConfig) and prompt.cache_frozen_layers):
        return 0
    return model.cached_layer if isinstance(model, TextPromptClassifier) else 0


def _layer_inputs(
    model: TextPromptClassifier, encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> torch.Tensor:
    """The unprompted states entering the deep prompt's first layer for every example [N, L, h],
    computed once in batches of ``batch_size`` (in the data's right-padded layout, on the CPU)."""
    chunks = []
    for start in range(0, len(encoded["input_ids"]), batch_size):
        batch = {name: t[start : start + batch_size].to(device) for name, t in encoded.items()}
        chunks.append(model.layer_inputs(batch).cpu())
    return torch.cat(chunks)


def _local_model(
    config: RunConfig, backbone_config: HFTextBackboneConfig, label_names: Sequence[str], device: torch.device
) -> tuple[TextPromptClassifier, int]:
    """The prompt module on a backbone loaded in this process, and the backbone's size in bytes."""
    backbone = load_backbone(backbone_config, config.head.kind, config.seed).to(device)
    with _checked_against_the_model("head"):
        head = build_head(config.head, backbone, label_names)
    with _checked_against_the_model("prompt"):
        prompt = build_prompt(config.prompt, backbone, config.seed, search_sigma(config.optimizer))
    with _checked_against_the_model("head.template"):
        if not isinstance(prompt, IntrinsicPrompt):
            placement = (
                config.prompt.placement if isinstance(config.prompt, SoftPromptConfig) else "after-cls"
            )
            model = TextPromptClassifier(backbone, prompt, head, config.head.template, placement)
            return model, backbone.num_bytes()
        opt = config.optimizer
        chunk = opt.chunk_size if isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig) else 1
        model = IntrinsicTextClassifier(backbone, prompt, head, config.head.template, chunk)
        return model, backbone.num_bytes()


@contextmanager
def _checked_against_the_model(field: str) -> Iterator[None]:
    """Report a setting that only the loaded model could check (a [MASK]-less masked-LM template,
    label words sharing a first token, an init phrase of no tokens) as a ConfigError on ``field``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc


def _trainer(config: RunConfig, accelerator: Accelerator) -> LocalTrainer:
    """The local trainer the optimizer section describes: by gradient, or black-box over z."""
    opt = config.optimizer
    if isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig):
        return build_blackbox_trainer(opt, config.strategy, accelerator.device, kseed_setup(config))
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
