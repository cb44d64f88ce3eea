"""Text classification through a frozen HF model with a soft prompt: verbaliser or similarity head."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.base import Batch, PromptModule
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.soft_prompt import TextPrompt

MASK_PLACEHOLDER = "[MASK]"
Placement = Literal["after-cls", "before-all"]


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
    skip the padding). Deep prompts overwrite those positions at the input of each prompted layer
    through forward pre-hooks that live only for one forward pass.
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
        for decoders). Compute it once and run any number of prompts on it."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if self.backbone.is_decoder:
            pad_id = self.backbone.tokenizer.pad_token_id
            input_ids, attention_mask = left_pad(input_ids, attention_mask, pad_id)
        return EmbeddedInputs(input_ids, attention_mask, self.backbone.embed(input_ids))

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
        """Class logits [B, C] of already embedded inputs under the given prompt vectors."""
        backbone = self.backbone
        input_ids, attention_mask, embeds = embedded.input_ids, embedded.attention_mask, embedded.embeds
        batch_size, m, pos = embeds.shape[0], prompt.num_tokens, self.prompt_position
        if prompt.input is None:
            slots = embeds.new_zeros(batch_size, m, embeds.shape[-1])
        else:
            slots = prompt.input.to(embeds.dtype)
            slots = slots.expand(batch_size, -1, -1) if slots.dim() == 2 else slots
            if slots.shape[0] != batch_size:
                raise ValueError(f"{slots.shape[0]} row prompts for a batch of {batch_size}")
        embeds = torch.cat([embeds[:, :pos], slots, embeds[:, pos:]], dim=1)
        ones = attention_mask.new_ones(batch_size, m)
        mask = torch.cat([attention_mask[:, :pos], ones, attention_mask[:, pos:]], dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0) if backbone.is_decoder else None

        with self._layer_prompts(prompt):
            if isinstance(self.head, SimilarityHead):
                cls_index = m if self._cls_after_prompt else 0
                return self.head(backbone.hidden_states(embeds, mask, position_ids), mask, cls_index)
            if self._uses_mask:
                hits = input_ids == backbone.tokenizer.mask_token_id
                if not bool(hits.any(1).all()):
                    raise ValueError("an input lost its [MASK] token; raise backbone.max_length")
                positions = hits.int().argmax(1)
                positions = positions + m * (positions >= pos)
            else:
                positions = torch.full((batch_size,), embeds.shape[1] - 1, device=embeds.device)
            return self.head(backbone.lm_logits(embeds, mask, positions, position_ids))

    @contextmanager
    def _layer_prompts(self, prompt: TextPrompt) -> Iterator[None]:
        if prompt.layers is None:
            yield
            return
        layers = self.backbone.layers
        end = prompt.start_layer + prompt.layers.shape[0]
        if end > len(layers):
            raise ValueError(
                f"prompts for layers {prompt.start_layer}..{end - 1}, the model has {len(layers)}"
            )
        with ExitStack() as stack:
            for offset, layer in enumerate(layers[prompt.start_layer : end]):
                hook = _overwrite_positions(prompt.layers[offset], self.prompt_position)
                stack.callback(layer.register_forward_pre_hook(hook, with_kwargs=True).remove)
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
    """A batch after the prompt-independent work: ids and mask (left-padded for decoders) and the
    token embeddings [B, L, h]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    embeds: torch.Tensor

    def repeat(self, count: int) -> EmbeddedInputs:
        """The batch ``count`` times over (rows [b0..bB, b0..bB, ...]), one copy per prompt candidate."""
        return EmbeddedInputs(
            self.input_ids.repeat(count, 1),
            self.attention_mask.repeat(count, 1),
            self.embeds.repeat(count, 1, 1),
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
    width = input_ids.shape[1]
    shift = width - attention_mask.sum(1, keepdim=True)
    source = torch.arange(width, device=input_ids.device).unsqueeze(0) - shift
    valid = source >= 0
    ids = torch.where(valid, input_ids.gather(1, source.clamp(min=0)), torch.full_like(input_ids, pad_id))
    return ids, valid.to(attention_mask.dtype)
