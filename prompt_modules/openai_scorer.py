"""Label scorers over OpenAI-compatible servers: text to any of them, embeddings to vLLM.

``OpenAIScorer`` sends each text as one request for one next token with its ``top_logprobs``
(``/v1/completions``, or ``/v1/chat/completions`` with the text as a user message) and reads the
label words from them (``label_scores.match_listed``; the floor for a word left out).

``VLLMScorer`` adds what vLLM offers beyond that: ``prompt_embeds`` (the base64 of a ``torch.save``
of one dense float tensor [L, h], the whole embedded input; vLLM started with
``--enable-prompt-embeds``), and ``logprob_token_ids``, which returns the label words'
log-probabilities by id whatever their rank, so nothing is floored. Tensors are checked before
they leave (dense, 2-D, the model's hidden size, finite): a malformed tensor has been a security
problem for vLLM itself (CVE-2025-62164), so the client never sends one.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import torch

from prompt_modules.label_scores import LabelScores, LabelWords, match_listed
from prompt_modules.openai_client import OpenAICompatibleClient, ServerError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OpenAIScorer:
    """Owns the requests that score label words after texts on one OpenAI-compatible server: the
    served model's name, the endpoint (completions or chat) and the top-k asked for."""

    def __init__(
        self,
        client: OpenAICompatibleClient,
        model: str,
        endpoint: str = "completions",
        top_logprobs: int = 20,
    ) -> None:
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        self.client = client
        self.model = model
        self.endpoint = endpoint
        self.top_logprobs = top_logprobs

    def usage(self) -> dict[str, int]:
        return self.client.usage.snapshot()

    def score_texts(self, texts: Sequence[str], labels: LabelWords) -> LabelScores:
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        return self._scored(path, [self._text_body(text, labels) for text in texts], labels)

    def _text_body(self, text: str, labels: LabelWords) -> dict[str, Any]:
        if self.endpoint == "chat":
            return {
                "model": self.model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
            }
        return {**self._completion_body(labels), "prompt": text}

    def _completion_body(self, labels: LabelWords) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": self.top_logprobs}

    def _scored(self, path: str, bodies: list[dict[str, Any]], labels: LabelWords) -> LabelScores:
        answers = self.client.post_many(path, bodies)
        values, floored = [], []
        for body, answer in zip(bodies, answers, strict=True):
            if stopped_at_once(answer):
                # the end-of-sequence token was the most likely: the server generated nothing and
                # listed nothing (llama.cpp's server). Ask once more with it forbidden as the token to
                # generate (min_tokens); the log-probabilities listed are of the same next-token
                # distribution (or, where a server renormalises without it, all shifted by one
                # constant, which leaves the class probabilities as they were).
                answer = self.client.post(path, {**body, "min_tokens": 1})
            listed = top_logprobs_of(answer, f"{self.client.url}{path}")
            row, hit = match_listed(listed, labels)
            values.append(row)
            floored.append(hit)
        return LabelScores(
            torch.tensor(values, dtype=torch.float64).reshape(len(answers), len(labels.ids)),
            torch.tensor(floored, dtype=torch.bool).reshape(len(answers), len(labels.ids)),
        )


class VLLMScorer(OpenAIScorer):
    """An ``OpenAIScorer`` on a vLLM server that also scores embedded inputs (``prompt_embeds``) and
    asks for the label words by id (``logprob_token_ids``; keys ``token_id:<id>`` through
    ``return_tokens_as_token_ids``) when ``by_id`` and the label ids are known."""

    def __init__(
        self,
        client: OpenAICompatibleClient,
        model: str,
        hidden_size: int,
        *,
        top_logprobs: int = 20,
        by_id: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(client, model, "completions", top_logprobs)
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
        self.hidden_size = hidden_size
        self.by_id = by_id
        self.dtype = TORCH_DTYPES[dtype]

    def _completion_body(self, labels: LabelWords) -> dict[str, Any]:
        body = {**super()._completion_body(labels), "return_tokens_as_token_ids": True}
        if self.by_id and labels.known_ids:
            body["logprob_token_ids"] = list(labels.ids)
        return body

    def score_embeddings(self, sequences: Sequence[torch.Tensor], labels: LabelWords) -> LabelScores:
        base = self._completion_body(labels)
        bodies = [
            {**base, "prompt_embeds": encode_prompt_embeds(s, self.hidden_size, self.dtype)}
            for s in sequences
        ]
        return self._scored("/v1/completions", bodies, labels)

    def score_prompted(
        self, prompts: torch.Tensor, inputs: Sequence[torch.Tensor], labels: LabelWords
    ) -> LabelScores:
        """Every [prompt; input], each sent whole (one request each)."""
        return self.score_embeddings([torch.cat([p, x]) for p in prompts for x in inputs], labels)

    def score_tokens(self, sequences: Sequence[Sequence[int]], labels: LabelWords) -> LabelScores:
        base = self._completion_body(labels)
        bodies = [{**base, "prompt": [int(t) for t in ids]} for ids in sequences]
        return self._scored("/v1/completions", bodies, labels)


def encode_prompt_embeds(tensor: torch.Tensor, hidden_size: int, dtype: torch.dtype = torch.float32) -> str:
    """The base64 of ``torch.save`` of one dense, contiguous [L, hidden_size] tensor of finite
    values in ``dtype``, as vLLM's ``prompt_embeds`` takes it; ValueError for anything else."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_sparse:
        raise ValueError("prompt_embeds must be a dense tensor (sparse tensors are refused: CVE-2025-62164)")
    if tensor.dim() != 2 or tensor.shape[1] != hidden_size or tensor.shape[0] < 1:
        raise ValueError(f"prompt_embeds must be [tokens, {hidden_size}], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise ValueError("prompt_embeds must hold finite floating-point values")
    dense = tensor.detach().to("cpu", dtype).contiguous().clone()
    buffer = io.BytesIO()
    torch.save(dense, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def stopped_at_once(answer: dict[str, Any]) -> bool:
    """Whether a server generated no token at all (it stopped at the end-of-sequence token) and so
    listed no log-probabilities."""
    try:
        logprobs = answer["choices"][0].get("logprobs") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return False
    listed = logprobs.get("content") if "content" in logprobs else logprobs.get("top_logprobs")
    return not listed


def top_logprobs_of(answer: dict[str, Any], where: str) -> dict[str, float]:
    """The first generated token's top log-probabilities (token -> log-probability) of a completions
    or chat answer; ServerError when the answer holds none."""
    try:
        choice = answer["choices"][0]
        logprobs = choice["logprobs"]
        if "content" in logprobs:  # chat: a list of {token, logprob, top_logprobs: [{token, logprob}]}
            first = logprobs["content"][0]
            listed = {item["token"]: float(item["logprob"]) for item in first.get("top_logprobs") or []}
            listed.setdefault(first["token"], float(first["logprob"]))
            return listed
        top = logprobs["top_logprobs"][0]  # completions: one dict token -> log-probability per token
        listed = {str(token): float(value) for token, value in (top or {}).items()}
        tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
        if tokens and values and values[0] is not None:
            listed.setdefault(str(tokens[0]), float(values[0]))
        return listed
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ServerError(
            f"{where} answered without the next token's log-probabilities ({type(exc).__name__}: {exc}); "
            "does the server return logprobs for this model (and take min_tokens, asked for when it "
            "stops at once)?"
        ) from exc
