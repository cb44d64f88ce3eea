"""Prompt modules on a language model reached only through label-word log-probabilities
(``label_scores.LabelScorer``): soft and intrinsic prompts sent as input embeddings, and BDPL's
discrete prompts sent as text.

The client holds the prompt state, the public tokenizer, the template and, for embedded prompts,
the model's input-embedding table (what a model owner publishes so that clients can embed their
inputs; the rest of the weights stay with the server). Classes are scored by their label words
(``LabelWords.class_scores``), so cross-entropy, accuracy and every trainer work as with a local
verbaliser head. Each module counts the label words it scored and how many of them were the floor
(the word missing from a server's top-k), for the run's report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from prompt_modules.base import Batch, PromptModule, population_cross_entropy
from prompt_modules.hf_text import special_affixes
from prompt_modules.intrinsic import IntrinsicPrompt
from prompt_modules.label_scores import EmbeddingScorer, LabelScorer, LabelScores, LabelWords
from prompt_modules.soft_prompt import SoftPrompt
from prompt_modules.text_classifier import pad_right, template_affixes


def input_specials(tokenizer: Any, add_bos: bool | None) -> tuple[list[int], list[int]]:
    """The special token ids around each input: the tokenizer's own (``add_bos`` None), or only
    the beginning-of-sequence token (True), or none (False)."""
    if add_bos is None:
        return special_affixes(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos: true, but the tokenizer has no beginning-of-sequence token")
    return ([tokenizer.bos_token_id] if add_bos else []), []


TEXT_INDEX = "text_index"
"""Batch key of a discrete-prompt module's inputs: each row's index in the module's text table."""


class _LabelScoring(PromptModule):
    """What both modules share: the scorer, the label words and the floor counters."""

    def __init__(self, scorer: LabelScorer, labels: LabelWords) -> None:
        super().__init__(scorer)
        self.labels = labels
        self.scored_words = 0
        self.floored_words = 0

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    def _class_scores(self, scores: LabelScores) -> torch.Tensor:
        self.scored_words += scores.floored.numel()
        self.floored_words += int(scores.floored.sum())
        return self.labels.class_scores(scores.logprobs)

    def meter(self) -> dict[str, int]:
        """The scorer's usage and this module's floor counts so far (cumulative)."""
        return {
            **self.backbone.usage(),
            "scored_words": self.scored_words,
            "floored_words": self.floored_words,
        }


class EmbeddedPromptClassifier(_LabelScoring):
    """Owns a soft prompt (``SoftPrompt``, state ``prompt.embeddings`` [m, h]) or an intrinsic one
    (``IntrinsicPrompt``, state ``prompt.z``) and scores classes through an ``EmbeddingScorer``.

    Each input is [P; E(x)]: the m prompt vectors, then the input-embedding table's rows of the
    templated input's tokens (a decoder's prompt goes before everything, as in a local run).
    """

    def __init__(
        self,
        scorer: EmbeddingScorer,
        tokenizer: Any,
        embedding_table: torch.Tensor,
        template: str,
        labels: LabelWords,
        prompt: SoftPrompt | IntrinsicPrompt,
        max_length: int = 64,
        add_bos: bool | None = None,
    ) -> None:
        super().__init__(scorer, labels)
        if embedding_table.dim() != 2 or embedding_table.shape[1] != scorer.hidden_size:
            raise ValueError(
                f"the input-embedding table is {tuple(embedding_table.shape)}; the model's hidden size is "
                f"{scorer.hidden_size}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.register_buffer("embedding_table", embedding_table.detach().float(), persistent=False)
        self._prefix, self._suffix = template_affixes(template, False, None)
        self._specials = input_specials(tokenizer, add_bos)
        self._pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.prompt = prompt

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise fixed inputs once, as a server tokenises the whole templated string:
        right-padded ``input_ids`` and ``attention_mask`` [N, L]."""
        ids = [
            self._specials[0] + self.tokenizer(t, add_special_tokens=False)["input_ids"] + self._specials[1]
            for t in self.templated(texts)
        ]
        input_ids, attention_mask = pad_right(ids, self._pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def templated(self, texts: Sequence[str]) -> list[str]:
        """Each input in the template, its text cut (at a token) so that the whole takes at most
        ``max_length`` tokens with the special tokens: the string a server would be sent."""
        out = []
        for text in texts:
            whole = f"{self._prefix}{text}{self._suffix}"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            overflow = self._length(whole) - self.max_length
            if overflow > 0:
                keep = max(len(ids) - overflow, 0)
                while keep > 0:
                    whole = f"{self._prefix}{self.tokenizer.decode(ids[:keep])}{self._suffix}"
                    if self._length(whole) <= self.max_length:
                        break
                    keep -= 1
                if keep == 0:
                    raise ValueError(
                        f"the template leaves no room for text within max_length={self.max_length}"
                    )
            out.append(whole)
        return out

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + sum(
            map(len, self._specials)
        )

    def input_embeddings(self, batch: Batch) -> list[torch.Tensor]:
        """Each row's token embeddings [L_i, h], its padding dropped."""
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        table = self.embedding_table
        return [table[row[keep].to(table.device)] for row, keep in zip(ids, mask, strict=True)]

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.prompts_logits(self.prompt().input.detach()[None], batch)[0].to(batch["input_ids"].device)

    def prompts_logits(self, prompts: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class scores [P, B, C] of a batch under each prompt of ``prompts`` [P, m, h], in one call
        to the scorer (P·B sequences)."""
        if prompts.dim() != 3:
            raise ValueError(f"prompts must be [candidates, tokens, hidden], got {tuple(prompts.shape)}")
        inputs = self.input_embeddings(batch)
        prompts = prompts.detach().float().to(self.embedding_table.device)
        scores = self.backbone.score_prompted(prompts, inputs, self.labels)
        return self._class_scores(scores).reshape(prompts.shape[0], len(inputs), -1)


class EmbeddedIntrinsicClassifier(EmbeddedPromptClassifier):
    """An ``EmbeddedPromptClassifier`` on an intrinsic prompt that scores populations of z (a
    ``PopulationModule``): each candidate's prompt A z + p0, every input, one scorer call."""

    prompt: IntrinsicPrompt

    def population_logits(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class scores [P, B, C] under each candidate z of ``candidates`` [P, d]."""
        if candidates.dim() != 2:
            raise ValueError(f"candidates must be [P, d], got shape {tuple(candidates.shape)}")
        with torch.inference_mode():
            return self.prompts_logits(self.prompt.project(candidates.cpu()), batch)

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate z on the batch."""
        return population_cross_entropy(self.population_logits(candidates, batch), batch["labels"].cpu())


Parametrization = Literal["softmax", "simplex"]


class CategoricalPrompt(nn.Module):
    """Owns BDPL's distributions: one categorical over K candidates for each of n positions, as
    logits (``softmax``: state ``logits`` [n, K], starting at 0) or as the probabilities themselves
    (``simplex``: state ``probs`` [n, K], starting at 1/K, as the reference code keeps them)."""

    def __init__(self, positions: int, candidates: int, parametrization: Parametrization = "softmax") -> None:
        super().__init__()
        if positions < 1 or candidates < 2:
            raise ValueError(f"need >= 1 position and >= 2 candidates, got {positions} and {candidates}")
        if parametrization not in ("softmax", "simplex"):
            raise ValueError(f"parametrization must be 'softmax' or 'simplex', got {parametrization!r}")
        self.parametrization = parametrization
        if parametrization == "softmax":
            self.logits = nn.Parameter(torch.zeros(positions, candidates))
        else:
            self.probs = nn.Parameter(torch.full((positions, candidates), 1.0 / candidates))

    @property
    def weights(self) -> nn.Parameter:
        """The trained tensor: ``logits`` or ``probs``."""
        return self.logits if self.parametrization == "softmax" else self.probs

    def probabilities(self) -> torch.Tensor:
        """p [n, K] (float64): softmax of the logits, or the probabilities (clamped at 0, renormalised)."""
        weights = self.weights.detach().double()
        if self.parametrization == "softmax":
            return torch.softmax(weights, dim=-1)
        clamped = weights.clamp(min=0)
        return clamped / clamped.sum(-1, keepdim=True).clamp(min=1e-300)

    def most_likely(self) -> torch.Tensor:
        """Each position's most likely candidate [n] (the prompt evaluated)."""
        return self.weights.detach().argmax(-1)


class DiscretePromptClassifier(_LabelScoring):
    """Owns BDPL's discrete prompt (``CategoricalPrompt``, state ``prompt.logits`` or ``prompt.probs``),
    its candidate strings, the template and the inputs' text, and scores classes through a
    ``LabelScorer`` from text alone.

    A prompt (one candidate index per position) becomes the candidates joined by spaces; each input
    is that text, ``separator``, then the templated input. ``encode_texts`` keeps the templated texts
    in this module and gives each row its index (batch key ``text_index``), so batches stay tensors.
    """

    def __init__(
        self,
        scorer: LabelScorer,
        candidates: Sequence[str],
        positions: int,
        template: str,
        labels: LabelWords,
        separator: str = " ",
        parametrization: Parametrization = "softmax",
    ) -> None:
        super().__init__(scorer, labels)
        if len(set(candidates)) != len(candidates) or any(not c.strip() for c in candidates):
            raise ValueError("the candidate vocabulary must hold distinct, non-blank strings")
        self.candidates = list(candidates)
        self.separator = separator
        self._prefix, self._suffix = template_affixes(template, False, None)
        self._texts: list[str] = []
        self.prompt = CategoricalPrompt(positions, len(self.candidates), parametrization)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Keep the templated texts; their indices [N] in this module's table (``text_index``)."""
        start = len(self._texts)
        self._texts.extend(f"{self._prefix}{text}{self._suffix}" for text in texts)
        return {TEXT_INDEX: torch.arange(start, len(self._texts))}

    def prompt_text(self, indices: Sequence[int] | torch.Tensor) -> str:
        """The prompt one candidate index per position stands for."""
        return " ".join(self.candidates[int(i)] for i in indices)

    def texts_of(self, batch: Batch) -> list[str]:
        return [self._texts[int(i)] for i in batch[TEXT_INDEX].cpu()]

    def forward(self, batch: Batch) -> torch.Tensor:
        best = self.prompt.most_likely()[None]
        return self.sample_logits(best, batch)[0].to(batch[TEXT_INDEX].device)

    def sample_logits(self, samples: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class scores [S, B, C] of a batch under each sampled prompt of ``samples`` [S, n], in one
        call to the scorer (S·B texts)."""
        if samples.dim() != 2 or samples.shape[1] != self.prompt.weights.shape[0]:
            raise ValueError(
                f"samples must be [S, {self.prompt.weights.shape[0]}], got {tuple(samples.shape)}"
            )
        inputs = self.texts_of(batch)
        texts = [self.prompt_text(s) + self.separator + text for s in samples for text in inputs]
        scores = self.backbone.score_texts(texts, self.labels)
        return self._class_scores(scores).reshape(samples.shape[0], len(inputs), -1)

    def sample_losses(self, samples: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [S] of each sampled prompt on the batch."""
        return population_cross_entropy(self.sample_logits(samples, batch), batch["labels"].cpu())


def parity_gap(
    scorer: EmbeddingScorer, module: EmbeddedPromptClassifier, texts: Sequence[str]
) -> tuple[float, list[float]]:
    """The pre-flight check: the label words' log-probabilities after each plain templated input
    (no prompt) sent as embeddings (the client's tokenisation and embedding table) and as text (the
    server's own tokenisation). Returns the largest absolute difference (nats) and each input's."""
    encoded = module.encode_texts(texts)
    embedded = module.input_embeddings(encoded)
    by_embedding = scorer.score_embeddings(embedded, module.labels)
    by_text = scorer.score_texts(module.templated(texts), module.labels)
    per_input = (by_embedding.logprobs - by_text.logprobs).abs().amax(1)
    return float(per_input.max()), per_input.tolist()
