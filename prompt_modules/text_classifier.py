"""Text classification through a frozen HF model with a soft prompt: verbaliser or similarity head."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.attention_prefix import attention_prefixes
from prompt_modules.base import Batch, PromptModule
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.layer_scores import layer_score
from prompt_modules.soft_prompt import TextPrompt

MASK_PLACEHOLDER = "[MASK]"
Placement = Literal["after-cls", "before-all"]
LAYER_INPUT = "layer_input"
"""Batch key of the cached hidden states [B, L, h] entering a deep prompt's first layer."""


class SimilarityHead(nn.Module):
    """Owns the encoded label descriptions t_c and scores s(x)·t_c / τ (sentence encoders).

    The class embeddings are a non-persistent buffer: constant, computed once, never sent.
    """

    def __init__(self, class_embeddings: torch.Tensor, temperature: float, pooling: str) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.register_buffer(
            "class_embeddings", F.normalize(class_embeddings.float(), dim=-1), persistent=False
        )
        self.temperature = temperature
        self.pooling = pooling

    @classmethod
    def from_descriptions(
        cls, backbone: HFTextBackbone, descriptions: Sequence[str], temperature: float, pooling: str = "mean"
    ) -> SimilarityHead:
        """Encode each class description once through the frozen backbone, without a prompt."""
        ids, mask = pad_right(backbone.tokenize(descriptions), backbone.tokenizer.pad_token_id)
        ids, mask = ids.to(backbone.device), mask.to(backbone.device)
        with torch.no_grad():
            hidden = backbone.hidden_states(backbone.embed(ids), mask)
        return cls(pool(hidden, mask, pooling), temperature, pooling)

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, cls_index: int = 0) -> torch.Tensor:
        """Class logits [B, C]; ``cls_index``: where the [CLS] token sits (for ``cls`` pooling)."""
        sentence = F.normalize(pool(hidden, attention_mask, self.pooling, cls_index).float(), dim=-1)
        return sentence @ self.class_embeddings.T / self.temperature


class VerbalizerHead(nn.Module):
    """Owns the label-word token ids of each class; logit_c = mean LM logit of class c's words.

    A word's first sub-token stands for the word (encoded with a leading space, as it appears
    mid-sentence).
    """

    def __init__(self, word_ids: torch.Tensor, word_weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("word_ids", word_ids, persistent=False)
        self.register_buffer("word_weights", word_weights, persistent=False)

    @classmethod
    def from_label_words(
        cls, backbone: HFTextBackbone, label_words: Sequence[Sequence[str]]
    ) -> VerbalizerHead:
        owner: dict[int, int] = {}
        per_class: list[list[int]] = []
        for c, words in enumerate(label_words):
            if not words:
                raise ValueError(f"class {c} has no label words")
            ids = []
            for word in words:
                pieces = backbone.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
                if not pieces:
                    raise ValueError(f"label word {word!r} encodes to no token")
                if owner.setdefault(pieces[0], c) != c:
                    raise ValueError(
                        f"label word {word!r} of class {c} starts with the same token as a word of class "
                        f"{owner[pieces[0]]}; choose words that differ in their first token"
                    )
                ids.append(pieces[0])
            per_class.append(ids)
        width = max(len(ids) for ids in per_class)
        word_ids = torch.zeros(len(per_class), width, dtype=torch.long)
        weights = torch.zeros(len(per_class), width)
        for c, ids in enumerate(per_class):
            word_ids[c, : len(ids)] = torch.tensor(ids)
            weights[c, : len(ids)] = 1.0 / len(ids)
        return cls(word_ids, weights)

    @property
    def num_classes(self) -> int:
        return self.word_ids.shape[0]

    def forward(self, lm_logits: torch.Tensor) -> torch.Tensor:
        scores = lm_logits.float()[:, self.word_ids]  # [B, C, W]
        return (scores * self.word_weights).sum(-1)


class TextPromptClassifier(PromptModule):
    """Owns a text prompt (soft, deep, or any module returning a ``TextPrompt``) and a class head.

    Input layout: the prompt's m positions go right after the leading special token(s) of an
    encoder ([CLS] P x [SEP]; with ``placement="before-all"``, P [CLS] x [SEP] as PEFT lays out
    virtual tokens) and before everything for a decoder (P x, left-padded, with position ids that
    skip the padding). Deep ``replace`` prompts insert those positions at their
    first layer and overwrite them at the input of each prompted layer through forward pre-hooks;
    deep ``prefix`` prompts add key/value prefixes to the attention of their layers; both live only
    for one forward pass. Layers below a deep prompt's first layer k compute the unprompted model,
    so their output can be cached per dataset (``layer_inputs``, batch key ``LAYER_INPUT``).
    """

    def __init__(
        self,
        backbone: HFTextBackbone,
        prompt: nn.Module,
        head: SimilarityHead | VerbalizerHead,
        template: str = "{text}",
        placement: Placement = "after-cls",
    ) -> None:
        super().__init__(backbone)
        if placement not in ("after-cls", "before-all"):
            raise ValueError(f"placement must be 'after-cls' or 'before-all', got {placement!r}")
        self.prompt = prompt
        self.head = head
        self._uses_mask = isinstance(head, VerbalizerHead) and not backbone.is_decoder
        mask_token = backbone.tokenizer.mask_token if self._uses_mask else None
        self._prefix, self._suffix = template_affixes(template, self._uses_mask, mask_token)
        before_all = backbone.is_decoder or placement == "before-all"
        self.prompt_position = 0 if before_all else len(backbone.prefix_special_ids)
        self._cls_after_prompt = placement == "before-all" and not backbone.is_decoder

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise fixed inputs once: right-padded ``input_ids`` and ``attention_mask`` [N, L]."""
        ids = self.backbone.tokenize(texts, self._prefix, self._suffix)
        input_ids, attention_mask = pad_right(ids, self.backbone.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits_for(self.prompt(), batch)

    def logits_for(self, prompt: TextPrompt, batch: Batch) -> torch.Tensor:
        """Class logits [B, C] for a batch under the given prompt vectors."""
        return self.logits_embedded(prompt, self.embed_inputs(batch))

    def embed_inputs(self, batch: Batch) -> EmbeddedInputs:
        """The prompt-independent part of a forward pass: token embeddings and masks (left-padded
        for decoders), and the batch's cached states entering the first prompted layer when it
        holds them (``LAYER_INPUT``). Compute it once and run any number of prompts on it."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        hidden = batch.get(LAYER_INPUT)
        if hidden is not None and hidden.shape[:2] != input_ids.shape:
            raise ValueError(
                f"cached layer inputs {tuple(hidden.shape)} do not match input_ids {tuple(input_ids.shape)}"
            )
        if self.backbone.is_decoder:
            pad_id = self.backbone.tokenizer.pad_token_id
            if hidden is not None:
                hidden = left_align(hidden, attention_mask)
            input_ids, attention_mask = left_pad(input_ids, attention_mask, pad_id)
        return EmbeddedInputs(input_ids, attention_mask, self.backbone.embed(input_ids), hidden)

    @property
    def cached_layer(self) -> int:
        """The first prompted layer whose input ``layer_inputs`` computes, 0 when there is none to cache
        (an input prompt, or a deep prompt from layer 0)."""
        return int(getattr(self.prompt, "start_layer", 0))

    @torch.no_grad()
    def layer_inputs(self, batch: Batch) -> torch.Tensor:
        """The hidden states [B, L, h] entering the first prompted layer for a right-padded batch, in
        the batch's layout: prompt-independent, so a dataset's can be computed once (``LAYER_INPUT``)."""
        layer = self.cached_layer
        if layer < 1:
            raise ValueError("this prompt starts at the input layer; there are no frozen layers below it")
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        return self.backbone.hidden_before(
            layer, self.backbone.embed(input_ids), attention_mask, self._position_ids(attention_mask)
        )

    @torch.no_grad()
    def input_features(self, batch: Batch) -> torch.Tensor:
        """Sentence features [B, h] of a batch that no prompt changes: the frozen model's last hidden
        states, mean-pooled over the attended positions."""
        embedded = self.embed_inputs(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        )
        mask = embedded.attention_mask
        hidden = self.backbone.hidden_states(embedded.embeds, mask, self._position_ids(mask))
        return pool(hidden, mask, "mean").float()

    @torch.no_grad()
    def layer_scores(self, batch: Batch, layers: Sequence[int]) -> list[float]:
        """FedPepTAO's score of each of ``layers`` on a batch (``prompt_modules.layer_scores``): the
        unprompted model's outputs of those layers, compared across the batch's examples."""
        embedded = self.embed_inputs(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        )
        mask = embedded.attention_mask
        outputs = self.backbone.layer_outputs(embedded.embeds, mask, self._position_ids(mask))
        return [layer_score(outputs[layer], mask) for layer in layers]

    def _position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Decoders count positions over attended tokens only (padding may sit anywhere)."""
        return (attention_mask.cumsum(1) - 1).clamp(min=0) if self.backbone.is_decoder else None

    def logits_for_prompts(self, prompts: torch.Tensor, batch: Batch, chunk_size: int) -> torch.Tensor:
        """Class logits [P, B, C] of a batch under each of ``prompts`` [P, m, h] (input prompts).

        The inputs are embedded once; the prompts then run ``chunk_size`` at a time, each chunk as
        one forward pass over chunk·B rows (on a small CPU a stacked forward can be slower than a
        loop, so the chunk size is a measured setting).
        """
        if prompts.dim() != 3:
            raise ValueError(
                f"prompts must be [candidates, tokens, hidden], got shape {tuple(prompts.shape)}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        embedded = self.embed_inputs(batch)
        rows = embedded.input_ids.shape[0]
        out = []
        for start in range(0, prompts.shape[0], chunk_size):
            chunk = prompts[start : start + chunk_size]
            count = chunk.shape[0]
            inputs = embedded if count == 1 else embedded.repeat(count)
            prompt = TextPrompt(input=chunk[0] if count == 1 else chunk.repeat_interleave(rows, dim=0))
            out.append(self.logits_embedded(prompt, inputs).reshape(count, rows, -1))
        return torch.cat(out)

    def logits_embedded(self, prompt: TextPrompt, embedded: EmbeddedInputs) -> torch.Tensor:
        """Class logits [B, C] of already embedded inputs under the given prompt vectors.

        Prompts that start at layer k > 0 (deep ``replace``, or a prefix with cached layer inputs)
        run in two stages: the unprompted states entering layer k (cached in the batch, or computed
        without the layers above), then layers k.. with the prompt.
        """
        backbone = self.backbone
        input_ids, attention_mask = embedded.input_ids, embedded.attention_mask
        batch_size, m, pos = input_ids.shape[0], prompt.inserted_tokens, self.prompt_position
        start = prompt.start_layer
        if start >= backbone.num_layers:
            raise ValueError(f"a prompt from layer {start}; the model has {backbone.num_layers} layers")
        staged = start > 0 and (prompt.layers is not None or embedded.hidden is not None)
        if staged:
            sequence = embedded.hidden
            if sequence is None:
                sequence = backbone.hidden_before(
                    start, embedded.embeds, attention_mask, self._position_ids(attention_mask)
                )
        else:
            sequence = embedded.embeds
        if m:
            if prompt.input is None:
                slots = sequence.new_zeros(batch_size, m, sequence.shape[-1])  # overwritten at layer k
            else:
                slots = prompt.input.to(sequence.dtype)
                slots = slots.expand(batch_size, -1, -1) if slots.dim() == 2 else slots
                if slots.shape[0] != batch_size:
                    raise ValueError(f"{slots.shape[0]} row prompts for a batch of {batch_size}")
            sequence = torch.cat([sequence[:, :pos], slots, sequence[:, pos:]], dim=1)
            ones = attention_mask.new_ones(batch_size, m)
            attention_mask = torch.cat([attention_mask[:, :pos], ones, attention_mask[:, pos:]], dim=1)
        position_ids = self._position_ids(attention_mask)

        with ExitStack() as stack:
            if staged:
                stack.enter_context(backbone.running_from(start, sequence))
            stack.enter_context(self._layer_prompts(prompt))
            if isinstance(self.head, SimilarityHead):
                cls_index = m if self._cls_after_prompt else 0
                return self.head(
                    backbone.hidden_states(sequence, attention_mask, position_ids), attention_mask, cls_index
                )
            if self._uses_mask:
                hits = input_ids == backbone.tokenizer.mask_token_id
                if not bool(hits.any(1).all()):
                    raise ValueError("an input lost its [MASK] token; raise backbone.max_length")
                positions = hits.int().argmax(1)
                positions = positions + m * (positions >= pos)
            else:
                positions = torch.full((batch_size,), sequence.shape[1] - 1, device=sequence.device)
            return self.head(backbone.lm_logits(sequence, attention_mask, positions, position_ids))

    @contextmanager
    def _layer_prompts(self, prompt: TextPrompt) -> Iterator[None]:
        """Deep prompts for the duration of a forward pass: key/value prefixes in the attention of
        their layers, or hooks that overwrite the prompt positions at their layers' inputs."""
        ids = prompt.deep_layers
        if not ids:
            yield
            return
        layers = self.backbone.layers
        if ids[-1] >= len(layers):
            raise ValueError(f"prompts for layers {list(ids)}, the model has {len(layers)}")
        if prompt.prefix is not None:
            prefixes = {layer: (p[0], p[1]) for layer, p in zip(ids, prompt.prefix, strict=True)}
            with attention_prefixes(self.backbone.model, prefixes):
                yield
            return
        with ExitStack() as stack:
            for offset, layer in enumerate(ids):
                hook = _overwrite_positions(prompt.layers[offset], self.prompt_position)
                stack.callback(layers[layer].register_forward_pre_hook(hook, with_kwargs=True).remove)
            yield


def _overwrite_positions(values: torch.Tensor, start: int) -> Callable:
    """A forward pre-hook that writes ``values`` [m, h] over positions start..start+m of the hidden states."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = values.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        hidden = torch.cat([hidden[:, :start], rows, hidden[:, start + values.shape[0] :]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


@dataclass(frozen=True)
class EmbeddedInputs:
    """A batch after the prompt-independent work: ids and mask (left-padded for decoders), the
    token embeddings [B, L, h] and, when cached, the states entering the first prompted layer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    embeds: torch.Tensor
    hidden: torch.Tensor | None = None

    def repeat(self, count: int) -> EmbeddedInputs:
        """The batch ``count`` times over (rows [b0..bB, b0..bB, ...]), one copy per prompt candidate."""
        return EmbeddedInputs(
            self.input_ids.repeat(count, 1),
            self.attention_mask.repeat(count, 1),
            self.embeds.repeat(count, 1, 1),
            None if self.hidden is None else self.hidden.repeat(count, 1, 1),
        )


def template_affixes(template: str, masked_lm_verbalizer: bool, mask_token: str | None) -> tuple[str, str]:
    """The text before and after ``{text}`` in an input template, with [MASK] replaced by the
    tokenizer's mask token for masked-LM verbalisers; ValueError for a template that cannot work."""
    if template.count("{text}") != 1:
        raise ValueError(f"the template must contain '{{text}}' exactly once, got {template!r}")
    prefix, suffix = template.split("{text}")
    if masked_lm_verbalizer:
        if mask_token is None or MASK_PLACEHOLDER not in template:
            raise ValueError(
                f"a masked-LM verbaliser needs {MASK_PLACEHOLDER} in the template, got {template!r}"
            )
        return prefix.replace(MASK_PLACEHOLDER, mask_token), suffix.replace(MASK_PLACEHOLDER, mask_token)
    if MASK_PLACEHOLDER in template:
        raise ValueError(
            f"{MASK_PLACEHOLDER} belongs in masked-LM verbaliser templates only, got {template!r}"
        )
    return prefix, suffix


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, cls_index: int = 0
) -> torch.Tensor:
    """Mean over attended positions, or the [CLS] position (``cls_index``, the first by default)."""
    if pooling == "cls":
        return hidden[:, cls_index]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def left_pad(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move right padding to the left, so every row's last token is at the last position."""
    source, valid = _left_source(attention_mask)
    ids = torch.where(valid, input_ids.gather(1, source.clamp(min=0)), torch.full_like(input_ids, pad_id))
    return ids, valid.to(attention_mask.dtype)


def left_align(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position values [B, L, ...] of a right-padded batch moved as ``left_pad`` moves its ids
    (the padding positions then hold copies of the first position: masked, never read)."""
    source, _ = _left_source(attention_mask)
    index = source.clamp(min=0).reshape(*source.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, index.expand(-1, -1, *values.shape[2:]))


def _left_source(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of the left-padded layout, the right-padded position it takes (< 0: padding)."""
    width = attention_mask.shape[1]
    shift = width - attention_mask.sum(1, keepdim=True)
    source = torch.arange(width, device=attention_mask.device).unsqueeze(0) - shift
    return source, source >= 0
