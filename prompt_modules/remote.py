"""A backbone reached only over HTTP (the client side of ``fedprompt serve``).

The client holds the prompt state z, the public tokenizer and the plain-data specs of its
projection and head; the service holds the weights. Inputs go as token ids (tokenised once, on
the client), candidates as z, and what comes back is logits or one loss per candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from prompt_modules.base import Batch, PromptModule
from prompt_modules.heads import SimilarityHeadSpec, VerbalizerHeadSpec
from prompt_modules.hf_text import special_affixes, tokenize_with_template
from prompt_modules.intrinsic import IntrinsicVector, ProjectionSpec
from prompt_modules.remote_schema import (
    LogitsRequest,
    LogitsResponse,
    LossRequest,
    LossResponse,
    ServiceInfo,
    Usage,
)
from prompt_modules.text_classifier import pad_right, template_affixes

log = logging.getLogger("prompt_modules.remote")

_RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
"""Failures before the service could answer (or as it dropped the connection): worth a retry."""


class RemoteBackboneError(RuntimeError):
    """The service could not be reached, did not answer in time, or refused a request; the message
    says which, with the service's own reason for a refusal."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary: client and service must tokenise alike."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()


class RemoteBackbone:
    """Owns the HTTP connection to one inference service: the bearer token, a timeout per answer,
    and retries with exponential backoff on connection errors and 5xx answers only. A 4xx answer
    is the service refusing a request: it raises at once with the service's reason. A read timeout
    is not retried either (the service may still be computing)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(
                f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}"
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
        )
        self.info = ServiceInfo.model_validate(self._call("GET", "/v1/info"))

    def logits(self, request: LogitsRequest) -> torch.Tensor:
        """Class logits [P, B, C] of the request's inputs under each of its candidates."""
        answer = LogitsResponse.model_validate(self._call("POST", "/v1/logits", request.model_dump_json()))
        return torch.tensor(answer.logits, dtype=torch.float32)

    def losses(self, request: LossRequest) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate on the request's labelled inputs."""
        answer = LossResponse.model_validate(self._call("POST", "/v1/losses", request.model_dump_json()))
        return torch.tensor(answer.losses, dtype=torch.float32)

    def usage(self) -> Usage:
        """This client's counters on the service."""
        return Usage.model_validate(self._call("GET", "/v1/usage"))

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: str | None = None) -> Any:
        delay = self.backoff
        failure = ""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, content=body)
            except _RETRIED as exc:
                failure = f"{type(exc).__name__}: {exc}"
            except httpx.TimeoutException as exc:
                raise RemoteBackboneError(
                    f"{method} {self.url}{path} got no answer within {self.timeout} s; raise "
                    "backbone.timeout or send fewer candidates or inputs per request"
                ) from exc
            else:
                if response.is_success:
                    return response.json()
                reason = _reason(response)
                if response.status_code < 500:
                    raise RemoteBackboneError(
                        f"{method} {self.url}{path} was refused ({response.status_code}): {reason}"
                    )
                failure = f"HTTP {response.status_code}: {reason}"
            if attempt < self.retries:
                log.warning("%s %s%s failed (%s); retry in %.2f s", method, self.url, path, failure, delay)
                time.sleep(delay)
                delay *= 2
        raise RemoteBackboneError(
            f"{method} {self.url}{path} failed after {self.retries + 1} attempts; last: {failure}"
        )


def _reason(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text[:500]


class RemoteIntrinsicClassifier(PromptModule):
    """An intrinsic prompt z whose logits come from a remote backbone (a ``PopulationModule``).

    Owns z (state_dict ``prompt.z``, as the local ``IntrinsicTextClassifier``), the public
    tokenizer and template, and the projection and head specs the service rebuilds A, p0 and the
    head from; never a weight. ``encode_texts`` tokenises exactly as the local path does.
    """

    def __init__(
        self,
        backbone: RemoteBackbone,
        tokenizer: Any,
        template: str,
        head: SimilarityHeadSpec | VerbalizerHeadSpec,
        projection: ProjectionSpec,
    ) -> None:
        super().__init__(backbone)
        info = backbone.info
        if tokenizer_fingerprint(tokenizer) != info.tokenizer_sha256:
            raise RemoteBackboneError(
                f"the local tokenizer's vocabulary differs from that of the served model {info.model!r}; "
                "set backbone.tokenizer to the served model's tokenizer"
            )
        masked = isinstance(head, VerbalizerHeadSpec) and not info.is_decoder
        mask_token = tokenizer.mask_token if masked else None
        self._prefix, self._suffix = template_affixes(template, masked, mask_token)
        self._specials = special_affixes(tokenizer)
        self._pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.tokenizer = tokenizer
        self.head_spec = head
        self.projection = projection
        self.prompt = IntrinsicVector(projection.dim)

    @property
    def num_classes(self) -> int:
        return self.head_spec.num_classes

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise fixed inputs once: right-padded ``input_ids`` and ``attention_mask`` [N, L]."""
        max_length = self.backbone.info.max_length
        ids = tokenize_with_template(
            self.tokenizer, texts, self._prefix, self._suffix, max_length, self._specials
        )
        input_ids, attention_mask = pad_right(ids, self._pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.population_logits(self.prompt.z.detach()[None], batch)[0]

    def population_logits(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Class logits [P, B, C] under each candidate z of ``candidates`` [P, d], from the service."""
        request = LogitsRequest(
            projection=self.projection, head=self.head_spec, z=_rows_of(candidates), input_ids=_inputs(batch)
        )
        return self.backbone.logits(request).to(self.prompt.z.device)

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate z on the batch, computed by the service."""
        request = LossRequest(
            projection=self.projection,
            head=self.head_spec,
            z=_rows_of(candidates),
            input_ids=_inputs(batch),
            labels=batch["labels"].tolist(),
        )
        return self.backbone.losses(request).to(self.prompt.z.device)


def _rows_of(candidates: torch.Tensor) -> list[list[float]]:
    if candidates.dim() != 2:
        raise ValueError(f"candidates must be [P, d], got shape {tuple(candidates.shape)}")
    return candidates.detach().to("cpu", torch.float32).tolist()


def _inputs(batch: Batch) -> list[list[int]]:
    """Each row's token ids without its padding."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    return [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]
