"""The parts of a text task, each from its configuration section: the frozen backbone, the class
head (as plain data too, for a remote backbone) and the trainable prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedprompt.config import (
    ConfigError,
    DeepPromptConfig,
    HFTextBackboneConfig,
    IntrinsicPromptConfig,
    SimilarityHeadConfig,
    SoftPromptConfig,
    VerbalizerHeadConfig,
)
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.preflight import check_deep_layers
from fedprompt.training.blackbox import projection_spec
from prompt_modules.heads import HeadSpec, SimilarityHeadSpec, VerbalizerHeadSpec
from prompt_modules.heads import build_head as build_head_from_spec
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.intrinsic import IntrinsicPrompt
from prompt_modules.intrinsic_generator import GeneratedIntrinsicPrompt, ZGenerator
from prompt_modules.soft_prompt import (
    DeepPrompt,
    PrefixPrompt,
    SoftPrompt,
    init_prompt_embeddings,
    init_token_ids,
)
from prompt_modules.text_classifier import (
    SimilarityHead,
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
    layer_ids: Sequence[int] | None = None,
) -> SoftPrompt | DeepPrompt | PrefixPrompt | IntrinsicPrompt | GeneratedIntrinsicPrompt:
    """The trainable prompt, initialised from text, sampled vocabulary or noise (seeded); or an
    intrinsic prompt z = 0 on the projection the run seed fixes (``sigma``: BBT's σ in its scale).
    A key/value prefix starts at the frozen model's keys and values of the text's or sampled
    tokens, or at N(0, init_std²) entries. A deep prompt prompts ``layer_ids`` (the layers a
    selection chose), else the configuration's ``layers``, else every layer from ``start_layer``."""
    if isinstance(config, IntrinsicPromptConfig):
        prompt = IntrinsicPrompt.from_backbone(backbone, projection_spec(config, seed, sigma))
        if config.generator is None:
            return prompt
        spec = config.generator
        return GeneratedIntrinsicPrompt(prompt, spec.code_dim, spec.hidden, derive_seed(seed, "z-generator"))
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
    check_deep_layers(config, backbone.num_layers)
    chosen = list(layer_ids) if layer_ids is not None else config.layers
    ids = chosen if chosen is not None else list(range(config.start_layer, backbone.num_layers))
    explicit = None if chosen is None else ids
    if config.mode == "prefix":
        return PrefixPrompt(
            _prefix_init(config, backbone, generator, text_ids, ids), ids[0], explicit, config.prefix_dropout
        )
    return DeepPrompt(torch.stack([init() for _ in ids]), ids[0], explicit)


def z_generator(config: IntrinsicPromptConfig, seed: int) -> ZGenerator:
    """Fed-BBPT's generator of z a configuration describes (its code and first weights from the run seed)."""
    assert config.generator is not None
    spec = config.generator
    return ZGenerator(config.dim, spec.code_dim, spec.hidden, derive_seed(seed, "z-generator"))


def _prefix_init(
    config: DeepPromptConfig,
    backbone: HFTextBackbone,
    generator: torch.Generator,
    text_ids: list[int],
    layer_ids: Sequence[int],
) -> torch.Tensor:
    """Starting key/value prefixes [len(layer_ids), 2, kv_heads, m, head_dim] (fp32, CPU): the frozen
    model's keys and values of m tokens at those layers (init text/vocab), or N(0, init_std²) entries
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
    own = backbone.key_values(ids)[list(layer_ids)].float().cpu()
    if config.init == "random":
        return torch.randn(own.shape, generator=generator) * config.init_std
    return own


def _check_known_labels(field: str, given: dict, label_names: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(label_names))
    if unknown:
        raise ConfigError(
            f"{field}: labels {unknown} are not in the data; its labels are {list(label_names)}"
        )
