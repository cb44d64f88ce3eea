"""The seam between a prompt and a language model it reaches only through next-token log-probabilities.

A ``LabelScorer`` (llama.cpp in this process, a vLLM server, any OpenAI-compatible server) answers
one question for many inputs at once: the log-probability of each label word's first token as the
next token after the input. Inputs are text (every scorer), token ids, or input embeddings [L, h]
(scorers that take embeddings: ``EmbeddingScorer``). Classes are scored from their label words by
``LabelWords.class_scores``: the mean log-probability of a class's words, which is the mean of their
logits minus the log-normaliser, so its cross-entropy over the classes is exactly the one of a
local verbaliser head on the logits.

A server that returns only its top-k log-probabilities may leave a label word out. Its value is
then the **floor**: the largest log-probability that word can have given the answer,
min(the smallest listed log-probability, log(1 − the listed probability mass)), never more than
what the answer proves. ``LabelScores.floored`` marks the words that got it, so a run can report
the share of its candidates that hit the floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

MIN_REST_MASS = 1e-12
"""The probability mass left outside a top-k is never taken below this (log: −27.6)."""


@dataclass(frozen=True)
class LabelWords:
    """Each class's label words as the first token of the word with a leading space (as it
    follows the template): their ids when the tokenizer is known (-1 otherwise) and the text each
    token decodes to. ``words`` is the flat list of distinct tokens; ``classes[c]`` indexes class
    c's into it."""

    ids: tuple[int, ...]
    texts: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, label_words: Sequence[Sequence[str]]) -> LabelWords:
        """The first token of " word" for every word; ValueError when two classes share a first
        token or a word encodes to none (as ``VerbalizerHead``)."""
        ids: list[int] = []
        owner: dict[int, int] = {}
        classes = []
        for c, words in enumerate(label_words):
            if not words:
                raise ValueError(f"class {c} has no label words")
            mine = []
            for word in words:
                pieces = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
                if not pieces:
                    raise ValueError(f"label word {word!r} encodes to no token")
                if owner.setdefault(pieces[0], c) != c:
                    raise ValueError(
                        f"label word {word!r} of class {c} starts with the same token as a word of class "
                        f"{owner[pieces[0]]}; choose words that differ in their first token"
                    )
                if pieces[0] not in ids:
                    ids.append(pieces[0])
                mine.append(ids.index(pieces[0]))
            classes.append(tuple(dict.fromkeys(mine)))
        texts = tuple(tokenizer.decode([i]) for i in ids)
        return cls(tuple(ids), texts, tuple(classes))

    @classmethod
    def from_words(cls, label_words: Sequence[Sequence[str]]) -> LabelWords:
        """Label words without a tokenizer (a hosted API's): each word stands for its first token,
        matched by text (see ``match_listed``)."""
        texts: list[str] = []
        classes = []
        for c, words in enumerate(label_words):
            if not words:
                raise ValueError(f"class {c} has no label words")
            mine = []
            for word in words:
                text = " " + word.strip()
                if text in texts:
                    raise ValueError(f"label word {word!r} appears in two classes")
                texts.append(text)
                mine.append(len(texts) - 1)
            classes.append(tuple(mine))
        return cls(tuple([-1] * len(texts)), tuple(texts), tuple(classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def known_ids(self) -> bool:
        return all(i >= 0 for i in self.ids)

    def class_weights(self) -> torch.Tensor:
        """[C, W]: 1/|words of c| on class c's words, so scores = log-probs @ weights.T."""
        weights = torch.zeros(len(self.classes), len(self.ids), dtype=torch.float64)
        for c, members in enumerate(self.classes):
            weights[c, list(members)] = 1.0 / len(members)
        return weights

    def class_scores(self, word_logprobs: torch.Tensor) -> torch.Tensor:
        """Class scores [N, C] (float32) from the words' log-probabilities [N, W]."""
        return (word_logprobs.double() @ self.class_weights().T).float()


@dataclass
class LabelScores:
    """The label words' next-token log-probabilities of N inputs [N, W], and which of them are the
    floor (the word was not among the top-k the server returned)."""

    logprobs: torch.Tensor
    floored: torch.Tensor

    @classmethod
    def concat(cls, parts: Sequence[LabelScores]) -> LabelScores:
        return cls(torch.cat([p.logprobs for p in parts]), torch.cat([p.floored for p in parts]))


@runtime_checkable
class LabelScorer(Protocol):
    """Scores label words after text inputs (what every language-model backend can do)."""

    def score_texts(self, texts: Sequence[str], labels: LabelWords) -> LabelScores:
        """The label words' log-probabilities as the next token after each text."""
        ...

    def usage(self) -> dict[str, int]:
        """What the scorer has asked for so far, in its own units (requests, tokens)."""
        ...


@runtime_checkable
class EmbeddingScorer(LabelScorer, Protocol):
    """A scorer that also takes input embeddings (soft prompts): llama.cpp, vLLM's prompt_embeds."""

    hidden_size: int

    def score_embeddings(self, sequences: Sequence[torch.Tensor], labels: LabelWords) -> LabelScores:
        """The label words' log-probabilities as the next token after each embedded input [L_i, h]."""
        ...

    def score_tokens(self, sequences: Sequence[Sequence[int]], labels: LabelWords) -> LabelScores:
        """The same after each input given as token ids (the model's own embedding lookup)."""
        ...

    def score_prompted(
        self, prompts: torch.Tensor, inputs: Sequence[torch.Tensor], labels: LabelWords
    ) -> LabelScores:
        """The same after every [prompt; input] of ``prompts`` [P, m, h] and ``inputs`` [L_i, h]
        (P·B rows, prompt-major): a scorer may compute each prompt's part once."""
        ...


def floor_logprob(listed: Sequence[float]) -> float:
    """The largest log-probability a token missing from a top-k answer can have:
    min(smallest listed log-probability, log(1 − Σ listed probabilities)), the rest's mass never
    taken below ``MIN_REST_MASS``."""
    if not listed:
        return 0.0
    rest = 1.0 - sum(math.exp(v) for v in listed)
    return min(min(listed), math.log(max(rest, MIN_REST_MASS)))


def match_listed(listed: Mapping[str, float], labels: LabelWords) -> tuple[list[float], list[bool]]:
    """The label words' log-probabilities read from one answer's top-k (token -> log-probability),
    and which of them are the floor.

    A word is found by its token id (keys ``token_id:<id>``, vLLM's ``return_tokens_as_token_ids``)
    or by its token's exact text; without a known id, a listed token also matches when the word,
    stripped and lower-cased, starts with the token's (non-empty) stripped lower-case text, the
    longest such token winning (FedOne's rule, for hosted APIs whose tokenizer is not public).
    """
    floor = floor_logprob(list(listed.values()))
    by_id = {}
    for key, value in listed.items():
        if key.startswith("token_id:"):
            try:
                by_id[int(key.removeprefix("token_id:"))] = value
            except ValueError:
                continue
    values, floored = [], []
    for token_id, text in zip(labels.ids, labels.texts, strict=True):
        value = by_id.get(token_id) if token_id >= 0 else None
        if value is None:
            value = listed.get(text)
        if value is None and token_id < 0:
            value = _prefix_match(listed, text)
        floored.append(value is None)
        values.append(floor if value is None else float(value))
    return values, floored


def _prefix_match(listed: Mapping[str, float], text: str) -> float | None:
    word = text.strip().lower()
    best: tuple[int, float] | None = None
    for token, value in listed.items():
        piece = token.strip().lower()
        if piece and word.startswith(piece) and (best is None or len(piece) > best[0]):
            best = (len(piece), value)
    return None if best is None else best[1]
