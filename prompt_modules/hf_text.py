"""A frozen Hugging Face text model (encoder or decoder) and the seams prompts plug into."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

from prompt_modules.attention_prefix import captured_key_values
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
    deep prompts), ``hidden_states`` (last layer), ``lm_logits`` (the language-model head), and
    for prompts that start at layer k: ``hidden_before`` (the unprompted states entering layer k),
    ``running_from`` (a forward pass that runs layers k.. only, on given states) and
    ``key_values`` (each layer's own keys and values of a token sequence).
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
        self._stack_parent, self._stack_name = _parent_of(model, self.layers)
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

    # ------------------------------------------------------------------ layer ranges

    @contextmanager
    def _stack(self, start: int, stop: int) -> Iterator[None]:
        """Within the block, the model's layer stack holds layers ``start``..``stop - 1`` only."""
        if not 0 <= start < stop <= self.num_layers:
            raise ValueError(f"layers {start}..{stop - 1} are not a range of the model's {self.num_layers}")
        modules = self._stack_parent._modules
        modules[self._stack_name] = nn.ModuleList(list(self.layers)[start:stop])
        try:
            yield
        finally:
            modules[self._stack_name] = self.layers

    def hidden_before(
        self,
        layer: int,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The hidden states [B, T, h] entering ``layer`` (1 or more): the outputs of layers
        0..layer-1, computed as the whole model would, without running the layers above."""
        if layer < 1:
            raise ValueError(f"hidden_before needs a layer >= 1, got {layer}")
        captured: list[torch.Tensor] = []

        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self.layers[layer - 1].register_forward_hook(keep)
        try:
            with self._stack(0, layer):
                self.model.base_model(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
                )
        finally:
            handle.remove()
        return captured[-1]

    def layer_outputs(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The output [B, T, h] of every layer, in order, from one pass of the whole model."""
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for index, layer in enumerate(self.layers):

            def keep(module: nn.Module, args: tuple, output: Any, index: int = index) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output

            handles.append(layer.register_forward_hook(keep))
        try:
            self.model.base_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
            )
        finally:
            for handle in handles:
                handle.remove()
        return [captured[i] for i in range(self.num_layers)]

    @contextmanager
    def running_from(self, layer: int, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward pass (``hidden_states``, ``lm_logits``) runs layers ``layer``..
        only, the first of them on ``hidden`` [B, T, h]; the ``inputs_embeds`` it is given then only
        set the shapes (pass ``hidden``), while its mask and position ids apply to layers ``layer``.. ."""

        def substitute(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.layers[layer].register_forward_pre_hook(substitute, with_kwargs=True)
        try:
            with self._stack(layer, self.num_layers):
                yield
        finally:
            handle.remove()

    def key_values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each layer's keys and values of one token sequence ``input_ids`` [L] as attention sees them
        (after rotary embeddings): [num_layers, 2, kv_heads, L, head_dim], detached."""
        ids = input_ids.reshape(1, -1).to(self.device)
        with torch.no_grad(), captured_key_values(self.model) as captured:
            self.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if sorted(captured) != list(range(self.num_layers)):
            raise RuntimeError(f"captured the keys of layers {sorted(captured)} of {self.num_layers}")
        return torch.stack(
            [torch.stack([k[0], v[0]]) for k, v in (captured[i] for i in range(self.num_layers))]
        )


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


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds ``child`` as a direct child, and the child's attribute name there."""
    for module in model.modules():
        for name, candidate in module.named_children():
            if candidate is child:
                return module, name
    raise BackboneLoadError(f"could not find the parent of the layer stack of {type(model).__name__}")


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
