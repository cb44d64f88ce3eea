"""A frozen Hugging Face text model (encoder or decoder) and the seams prompts plug into."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
)

from prompt_modules.bundled import BUNDLED_MODELS, resolve_model_name

Head = Literal["none", "lm"]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneLoadError(RuntimeError):
    """A backbone that could not be loaded; the message says which model and how to fix it."""


class HFTextBackbone:
    """Owns one frozen Hugging Face text model and its tokenizer, shared by every client.

    Every parameter has ``requires_grad=False`` and the model stays in eval mode. The backbone is
    not an ``nn.Module`` on purpose: prompt modules hold it by reference, so their state_dict is
    the prompt alone. Seams: ``embed`` (token embeddings), ``layers`` (the transformer blocks, for
    deep prompts), ``hidden_states`` (last layer) and ``lm_logits`` (the language-model head).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any, max_length: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.is_decoder = is_decoder_config(model.config)
        self.has_lm_head = model.get_output_embeddings() is not None
        self._mlm_head = None if self.is_decoder else _single_head_module(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.layers = _find_layer_stack(model)
        self.prefix_special_ids, self.suffix_special_ids = special_affixes(tokenizer)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: str,
        *,
        head: Head = "none",
        gguf_file: str | None = None,
        revision: str | None = None,
        random_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        max_length: int = 128,
        seed: int = 0,
    ) -> HFTextBackbone:
        """Load a pretrained model (Hub name, local folder, ``bundled:`` alias, GGUF file), or build a
        randomly initialised one from ``random_config`` (seeded, for tests and mechanics)."""
        torch_dtype = TORCH_DTYPES[dtype]
        if random_config is not None:
            tok = load_tokenizer(tokenizer or f"bundled:{next(iter(BUNDLED_MODELS))}")
            settings = {
                "vocab_size": len(tok),
                "pad_token_id": tok.pad_token_id,
                "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id,
                "eos_token_id": tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id,
                **random_config,
            }
            model_type = settings.pop("model_type", None)
            if model_type is None:
                raise BackboneLoadError("random_config needs `model_type` (e.g. bert, gpt2, llama)")
            config = AutoConfig.for_model(model_type, **settings)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = _model_class(config, head).from_config(config, dtype=torch_dtype)
            return cls(net, tok, max_length)

        path, gguf = resolve_model_name(model, gguf_file)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        if gguf:
            kwargs["gguf_file"] = gguf
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
            net = _model_class(config, head).from_pretrained(path, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise BackboneLoadError(
                f"could not load the text model {model!r}"
                + (f" (GGUF file {gguf!r})" if gguf else "")
                + f": {exc}\nGive a local model folder as `backbone.model`, use a bundled one "
                f"({', '.join('bundled:' + k for k in BUNDLED_MODELS)}), or run with internet access once "
                "so the Hugging Face cache holds it (HF_HUB_OFFLINE=1 forbids downloads)."
            ) from exc
        tok = load_tokenizer(tokenizer or path, None if tokenizer else gguf, revision)
        return cls(net, tok, max_length)

    # ------------------------------------------------------------------ facts

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def num_bytes(self) -> int:
        """Bytes of every parameter and buffer of the model (what FedPrompt never sends)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def to(self, device: torch.device | str) -> HFTextBackbone:
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ seams

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ids (the input layer's lookup, before position embeddings)."""
        return self.model.get_input_embeddings()(input_ids)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def tokenize(self, texts: Sequence[str], prefix: str = "", suffix: str = "") -> list[list[int]]:
        """Ids of ``prefix + text + suffix`` with the model's special tokens, the text truncated so that
        the whole fits ``max_length`` (the template is never cut)."""
        specials = (self.prefix_special_ids, self.suffix_special_ids)
        return tokenize_with_template(self.tokenizer, texts, prefix, suffix, self.max_length, specials)

    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states [B, T, h] for input embeddings."""
        out = self.model.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
        )
        return out.last_hidden_state

    def lm_logits(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Language-model logits [B, V] at one position per row (``positions``, shape [B])."""
        if not self.has_lm_head:
            raise ValueError("this backbone was loaded without a language-model head (head='lm' needed)")
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        if self._mlm_head is not None:  # run the vocabulary projection at one position per row only
            return self._mlm_head(
                self.hidden_states(inputs_embeds, attention_mask, position_ids)[rows, positions]
            )
        kwargs: dict[str, Any] = {}
        last = inputs_embeds.shape[1] - 1
        if self.is_decoder and bool((positions == last).all()):
            kwargs["logits_to_keep"] = 1  # decoders predict at the last (left-padded) position only
        logits = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        ).logits
        if "logits_to_keep" in kwargs:
            return logits[:, -1]
        return logits[rows, positions]


def is_decoder_config(config: PretrainedConfig) -> bool:
    """Whether a model configuration describes a decoder (causal LM), read before any weights load."""
    if getattr(config, "is_decoder", False):
        return True
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) not in MODEL_FOR_MASKED_LM_MAPPING


def _model_class(config: PretrainedConfig, head: Head) -> type:
    if head == "none":
        return AutoModel
    if is_decoder_config(config):
        return AutoModelForCausalLM
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return AutoModelForMaskedLM
    raise BackboneLoadError(f"{type(config).__name__} has neither a masked-LM nor a causal-LM head")


def load_tokenizer(name: str, gguf_file: str | None = None, revision: str | None = None) -> Any:
    """A Hugging Face tokenizer by Hub name, local folder or ``bundled:`` alias (no model weights)."""
    path, gguf = resolve_model_name(name, gguf_file)
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"could not load the tokenizer {name!r}: {exc}") from exc


def _find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList of ``num_hidden_layers`` modules of one class."""
    want = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == want and len({type(m) for m in module}) == 1:
            return module
    raise BackboneLoadError(f"could not find the {want} transformer layers of {type(model).__name__}")


def _single_head_module(model: nn.Module) -> nn.Module | None:
    """The one child module besides the base model that maps hidden states to vocabulary logits
    (BERT's ``cls``, RoBERTa's ``lm_head``, ...); None when the head is spread over several."""
    if model.get_output_embeddings() is None:
        return None
    heads = [c for c in model.children() if c is not model.base_model and any(True for _ in c.parameters())]
    return heads[0] if len(heads) == 1 else None


def tokenize_with_template(
    tokenizer: Any,
    texts: Sequence[str],
    prefix: str,
    suffix: str,
    max_length: int,
    specials: tuple[Sequence[int], Sequence[int]],
) -> list[list[int]]:
    """Ids of ``specials[0] + prefix + text + suffix + specials[1]``, the text truncated so that the
    whole fits ``max_length`` (the template is never cut). Needs the tokenizer only, not the model."""
    affix_ids = tokenizer([prefix, suffix], add_special_tokens=False)["input_ids"]
    budget = max_length - len(affix_ids[0]) - len(affix_ids[1]) - len(specials[0]) - len(specials[1])
    if budget < 1:
        raise ValueError(f"the template leaves no room for text within max_length={max_length}")
    text_ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=budget)
    return [[*specials[0], *affix_ids[0], *ids, *affix_ids[1], *specials[1]] for ids in text_ids["input_ids"]]


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single sequence."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []
