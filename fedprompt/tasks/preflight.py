"""The configuration fields that depend on the model's shape, checked from its configuration alone.

pydantic validates a RunConfig without touching a model, but a few fields can only be checked
against the model's layer count: the first layer of a deep text prompt, the first layer and depth
of visual prompt tokens. ``check_model_fields`` reads the model's configuration (a Hugging Face
``config.json`` or GGUF header, an open_clip model config) without loading any weights, so these
errors too come before a model loads. When the configuration cannot be read here (a Hub model not
in the local cache, say), the check is left to the builder, and the loader's own error comes first.
The builders call the same check functions with the loaded model's layer counts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fedprompt.config import (
    DEFAULT_COOP_TOKENS,
    ConfigError,
    CoOpPromptConfig,
    DeepPromptConfig,
    HFTextBackboneConfig,
    OpenCLIPBackboneConfig,
    RunConfig,
    TwinPromptConfig,
    VPTPromptConfig,
    VQAPromptConfig,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger("fedprompt.preflight")


def check_deep_layers(config: DeepPromptConfig, num_layers: int) -> None:
    """A deep text prompt's layers must be the model's, and a selection must have enough to pick from."""
    if config.start_layer >= num_layers:
        raise ConfigError(
            f"prompt.start_layer: {config.start_layer} is past the last layer; the model has "
            f"{num_layers} layers (0..{num_layers - 1})"
        )
    if config.layers is not None and config.layers[-1] >= num_layers:
        raise ConfigError(
            f"prompt.layers: {config.layers[-1]} is past the last layer; the model has "
            f"{num_layers} layers (0..{num_layers - 1})"
        )
    candidates = num_layers - config.start_layer
    if config.select_layers is not None and config.select_layers > candidates:
        raise ConfigError(
            f"prompt.select_layers: {config.select_layers} layers cannot be chosen from the "
            f"{candidates} layers {config.start_layer}..{num_layers - 1}; lower it"
        )


def check_co_planning_depths(depths: list[int], prompt: DeepPromptConfig, num_layers: int) -> None:
    """FeS's co-planner can train at most the deep prompt's layers (every layer from start_layer up,
    the `layers` given, or the `select_layers` chosen)."""
    if prompt.layers is not None:
        rows = len(prompt.layers)
    elif prompt.select_layers is not None:
        rows = prompt.select_layers
    else:
        rows = num_layers - prompt.start_layer
    if max(depths) > rows:
        raise ConfigError(
            f"pseudo_labels.co_planning.depths: {max(depths)} layers cannot train in a prompt of {rows} "
            f"layers; keep the depths at most {rows}"
        )


def vpt_layers(config: VPTPromptConfig, total: int, field: str) -> int:
    """How many of a vision tower's ``total`` layers get their own visual prompt tokens (checked)."""
    if config.start_layer >= total:
        raise ConfigError(
            f"{field}.start_layer: {config.start_layer} is past the last vision layer (0..{total - 1})"
        )
    if not config.deep:
        return 1
    layers = config.depth if config.depth is not None else total - config.start_layer
    if config.start_layer + layers > total:
        raise ConfigError(
            f"{field}.depth: {layers} layers from {config.start_layer} pass the tower's {total} layers"
        )
    return layers


def check_coupled_depth(start_layer: int, layers: int, text_depth: int) -> None:
    """Coupled (MaPLe-style) visual prompts are functions of text prompts in the same layers."""
    if start_layer + layers > text_depth:
        raise ConfigError(
            "prompt.text.depth: coupled visual prompts in vision layers "
            f"{start_layer}..{start_layer + layers - 1} need text prompts in those layers; "
            f"raise prompt.text.depth to {start_layer + layers}"
        )


def context_phrase(config: CoOpPromptConfig, tokenizer: Any, field: str) -> tuple[int, list[int]]:
    """M, the number of CoOp context vectors, and the token ids of ``init_text`` that start them.

    As CoOp: with ``init: text`` M is the phrase's token count (each vector starts as one of its
    token embeddings); otherwise ``num_tokens`` (16 when unset). Raises ConfigError when
    ``num_tokens`` is given and contradicts the phrase, or the phrase has no tokens.
    """
    if config.init != "text" or not config.init_text:
        return config.num_tokens or DEFAULT_COOP_TOKENS, []
    from prompt_modules.clip_text_context import phrase_token_ids

    phrase = phrase_token_ids(tokenizer, config.init_text)
    if not phrase:
        raise ConfigError(f"{field}.init_text: {config.init_text!r} gives no tokens; give a phrase")
    if config.num_tokens is not None and config.num_tokens != len(phrase):
        raise ConfigError(
            f"{field}.num_tokens: {config.num_tokens} contradicts {field}.init_text {config.init_text!r}, "
            f"which is {len(phrase)} tokens; with init: text the context has one vector per token of the "
            f"phrase (CoOp), so remove num_tokens or set it to {len(phrase)}"
        )
    return len(phrase), phrase


def check_model_fields(config: RunConfig) -> None:
    """Check the layer-dependent fields of ``config`` against the model's configuration file."""
    prompt, backbone = config.prompt, config.backbone
    if isinstance(prompt, DeepPromptConfig) and isinstance(backbone, HFTextBackboneConfig):
        num_layers = text_layer_count(backbone)
        if num_layers is not None:
            check_deep_layers(prompt, num_layers)
            if config.pseudo_labels is not None and config.pseudo_labels.co_planning is not None:
                check_co_planning_depths(config.pseudo_labels.co_planning.depths, prompt, num_layers)
    if isinstance(backbone, OpenCLIPBackboneConfig):
        text = prompt.text if isinstance(prompt, TwinPromptConfig) else prompt
        if isinstance(text, CoOpPromptConfig) and text.init == "text":
            tokenizer = clip_tokenizer(backbone)
            if tokenizer is not None:
                context_phrase(text, tokenizer, "prompt.text" if text is not prompt else "prompt")
        nested = isinstance(prompt, TwinPromptConfig | VQAPromptConfig)
        visual = prompt.visual if nested else prompt
        if isinstance(visual, VPTPromptConfig):
            total = vision_layer_count(backbone)
            if total is None:
                return
            field = "prompt.visual" if nested else "prompt"
            layers = vpt_layers(visual, total, field)
            if isinstance(prompt, TwinPromptConfig) and prompt.coupled:
                check_coupled_depth(visual.start_layer, layers, prompt.text.depth)


def text_layer_count(config: HFTextBackboneConfig) -> int | None:
    """The layer count of a Hugging Face text model from its configuration (None: not readable here)."""
    model_config = text_model_config(config)
    return None if model_config is None else int(model_config.num_hidden_layers)


def text_model_config(config: HFTextBackboneConfig) -> PretrainedConfig | None:
    """A Hugging Face text model's configuration, read without its weights (None: not readable here,
    e.g. a Hub model not in the local cache)."""
    from transformers import AutoConfig

    from prompt_modules.bundled import resolve_model_name

    try:
        if config.random_config is not None:
            return AutoConfig.for_model(**config.random_config)
        path, gguf = resolve_model_name(config.model, config.gguf_file)
        kwargs = {"revision": config.revision, **({"gguf_file": gguf} if gguf else {})}
        return AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # unreadable here: the builder checks against the loaded model
        log.debug("configuration of %s not read before loading: %s", config.model, exc)
        return None


def vision_layer_count(config: OpenCLIPBackboneConfig) -> int | None:
    """The layer count of an open_clip ViT vision tower from its model config (None: not a ViT, or
    not readable here)."""
    import open_clip

    from fedprompt.tasks.clip.demo_backbone import DEMO_CLIP_ALIAS, DEMO_CLIP_MODEL
    from prompt_modules.clip_backbone import register_model_config
    from prompt_modules.hf_text import BackboneLoadError

    if config.model == DEMO_CLIP_ALIAS:
        return int(DEMO_CLIP_MODEL["vision_cfg"]["layers"])
    try:
        model_config = open_clip.get_model_config(register_model_config(config.model))
    except BackboneLoadError:
        return None
    layers = (model_config or {}).get("vision_cfg", {}).get("layers")
    return layers if isinstance(layers, int) else None


def clip_tokenizer(config: OpenCLIPBackboneConfig) -> Any | None:
    """The open_clip model's tokenizer, without its weights (None: not to be had here)."""
    import open_clip

    from prompt_modules.clip_backbone import register_model_config

    try:
        return open_clip.get_tokenizer(register_model_config(config.model))
    except Exception as exc:  # e.g. a Hub tokenizer offline: the builder checks against the loaded one
        log.debug("tokenizer of %s not read before loading: %s", config.model, exc)
        return None
