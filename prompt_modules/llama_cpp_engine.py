"""A GGUF model run in this process by llama.cpp, through llama-cpp-python's low-level API: a
``LabelScorer`` that takes text, token ids or input embeddings (``llama_batch.embd``) and returns
the exact next-token log-softmax of the label words over the full vocabulary.

Each input is decoded alone from an empty memory (the sequence's positions 0..L−1, logits of its
last position only), so inputs never see each other and the answer does not depend on what was
scored before. Inputs after one prompt share its keys and values: the prompt is decoded once, each
input after it and then removed (``prompted_logits``), the same computation under causal attention.
Text is tokenised as llama.cpp's own server tokenises a completion prompt (the model's beginning-of-
sequence rule, special tokens parsed), so the engine answers like ``python -m llama_cpp.server`` on
the same file. One decode at a time (a lock): the engine may be shared by threads (``fedprompt
serve``).
"""

from __future__ import annotations

import atexit
import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prompt_modules.label_scores import LabelScores, LabelWords


class LlamaCppError(RuntimeError):
    """llama.cpp could not load the model or decode an input; the message says which."""


class LlamaCppEngine:
    """Owns one llama.cpp model and its context (``context_length`` tokens, the longest input),
    and counts what it computed: inputs (``requests``) and their tokens (``prompt_tokens``)."""

    def __init__(self, path: str | Path, context_length: int = 512, threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LlamaCppError(
                "backbone.kind llama-cpp needs llama-cpp-python: pip install 'fedprompt[llama-cpp]' (it "
                "compiles llama.cpp, a few minutes)"
            ) from exc
        path = Path(path)
        if not path.is_file():
            raise LlamaCppError(f"no GGUF file at {path}")
        try:
            self._llama = Llama(
                model_path=str(path),
                n_ctx=context_length,
                n_batch=context_length,
                n_ubatch=context_length,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                embedding=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise LlamaCppError(f"llama.cpp could not load {path}: {exc}") from exc
        atexit.register(self._llama.close)  # before interpreter teardown unloads llama_cpp's bindings
        self.path = path
        self.context_length = context_length
        self.hidden_size = int(self._llama.n_embd())
        self.vocab_size = int(self._llama.n_vocab())
        self._lock = threading.Lock()
        self._requests = 0
        self._tokens = 0

    def usage(self) -> dict[str, int]:
        return {"requests": self._requests, "prompt_tokens": self._tokens, "completion_tokens": 0}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a completion prompt as llama.cpp's server makes them."""
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def score_texts(self, texts: Sequence[str], labels: LabelWords) -> LabelScores:
        return self.score_tokens([self.tokenize(text) for text in texts], labels)

    def score_tokens(self, sequences: Sequence[Sequence[int]], labels: LabelWords) -> LabelScores:
        rows = [self._label_logprobs(self.last_logits(tokens=list(ids)), labels) for ids in sequences]
        return _scores(rows, len(labels.ids))

    def score_embeddings(self, sequences: Sequence[torch.Tensor], labels: LabelWords) -> LabelScores:
        rows = [self._label_logprobs(self.last_logits(embeddings=self._array(s)), labels) for s in sequences]
        return _scores(rows, len(labels.ids))

    def score_prompted(
        self, prompts: torch.Tensor, inputs: Sequence[torch.Tensor], labels: LabelWords
    ) -> LabelScores:
        """Every input [L_i, h] after every prompt of ``prompts`` [P, m, h] (rows prompt-major): the
        prompt is decoded once, then each input after it (``prompted_logits``)."""
        rows = []
        arrays = [self._array(embedded) for embedded in inputs]
        for prompt in prompts:
            for logits in self.prompted_logits(self._array(prompt), arrays):
                rows.append(self._label_logprobs(logits, labels))
        return _scores(rows, len(labels.ids))

    def _array(self, embedded: torch.Tensor) -> np.ndarray:
        if embedded.dim() != 2 or embedded.shape[1] != self.hidden_size:
            raise ValueError(f"embeddings must be [tokens, {self.hidden_size}], got {tuple(embedded.shape)}")
        return np.ascontiguousarray(embedded.detach().to("cpu", torch.float32).numpy())

    def _label_logprobs(self, logits: np.ndarray, labels: LabelWords) -> list[float]:
        if not labels.known_ids:
            raise ValueError("llama.cpp scores label words by token id; build LabelWords from the tokenizer")
        return _log_softmax(logits)[list(labels.ids)].tolist()

    def last_logits(
        self, tokens: list[int] | None = None, embeddings: np.ndarray | None = None
    ) -> np.ndarray:
        """The logits [V] at the last position of one input decoded alone (tokens, or embeddings [L, h])."""
        from llama_cpp import llama_cpp as C

        length = len(tokens) if tokens is not None else embeddings.shape[0]
        self._check_length(length)
        with self._lock:
            C.llama_memory_clear(C.llama_get_memory(self._llama.ctx), True)
            return self._decode(0, tokens, embeddings)

    def prompted_logits(self, prompt: np.ndarray, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The logits [V] at the last position of each input [L_i, h] decoded after ``prompt``
        [m, h]: the prompt's keys and values are computed once (positions 0..m−1), each input
        then at positions m.. and removed again, so inputs never see each other. Causal attention
        makes this the same computation as decoding each [prompt; input] alone."""
        from llama_cpp import llama_cpp as C

        for embedded in inputs:
            self._check_length(prompt.shape[0] + embedded.shape[0])
        out = []
        with self._lock:
            memory = C.llama_get_memory(self._llama.ctx)
            C.llama_memory_clear(memory, True)
            self._decode(0, None, prompt, want_logits=False)
            for embedded in inputs:
                out.append(self._decode(prompt.shape[0], None, embedded))
                C.llama_memory_seq_rm(memory, 0, prompt.shape[0], -1)
        return out

    def _check_length(self, length: int) -> None:
        if length < 1:
            raise ValueError("an input needs at least one token")
        if length > self.context_length:
            raise ValueError(
                f"an input of {length} tokens (prompt included) exceeds the context of "
                f"{self.context_length}; raise backbone.context_length or lower backbone.max_length"
            )

    def _decode(
        self, start: int, tokens: list[int] | None, embeddings: np.ndarray | None, want_logits: bool = True
    ) -> np.ndarray | None:
        """Decode tokens or embeddings at positions start.. of sequence 0 (lock held); the logits [V]
        of the last one when ``want_logits``."""
        from llama_cpp import llama_cpp as C

        length = len(tokens) if tokens is not None else embeddings.shape[0]
        batch = C.llama_batch_init(length, 0 if tokens is not None else self.hidden_size, 1)
        try:
            batch.n_tokens = length
            for i in range(length):
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want_logits and i == length - 1
            if tokens is not None:
                for i, token in enumerate(tokens):
                    if not 0 <= token < self.vocab_size:
                        raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
                    batch.token[i] = token
            else:
                ctypes.memmove(batch.embd, embeddings.ctypes.data, embeddings.nbytes)
            status = C.llama_decode(self._llama.ctx, batch)
            if status != 0:
                raise LlamaCppError(f"llama_decode failed with status {status} on {length} tokens")
            self._tokens += length
            if not want_logits:
                return None
            self._requests += 1
            pointer = C.llama_get_logits_ith(self._llama.ctx, length - 1)
            return np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy()
        finally:
            C.llama_batch_free(batch)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    shifted = values - values.max()
    return shifted - np.log(np.exp(shifted).sum())


def _scores(rows: list[list[float]], width: int) -> LabelScores:
    logprobs = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), width)
    return LabelScores(logprobs, torch.zeros(logprobs.shape, dtype=torch.bool))
