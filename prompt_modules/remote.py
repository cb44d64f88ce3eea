"""A backbone reached only over HTTP (the client side of ``fedprompt serve``).

The client holds the prompt state z, the public tokenizer and the plain-data specs of its
projection and head; the service holds the weights. Inputs go as token ids (tokenised once, on
the client), candidates as z, and what comes back is logits or one loss per candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from prompt_modules import http_answers
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
_WAIT_AND_RETRY = (409, 429)
"""Answers that say when to come back (``Retry-After``): a rate limit, a lockout, a replay in progress."""
IDEMPOTENCY_HEADER = "Idempotency-Key"


class RemoteBackboneError(RuntimeError):
    """The service could not be reached, did not answer in time, or refused a request; the message
    says which, with the service's own reason for a refusal."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary: client and service must tokenise alike."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()


def tls_context(
    ca_file: str | Path | None = None, client_cert: tuple[str | Path, str | Path] | None = None
) -> ssl.SSLContext:
    """The client's TLS context: the system's trusted CAs, or only ``ca_file``'s (a private or
    self-signed CA); with ``client_cert`` (certificate, key) for services that require one."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if client_cert is not None:
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    return context


def _raise_on_tls_refusal(where: str, exc: httpx.TransportError) -> None:
    """RemoteBackboneError naming the TLS field to set when ``exc`` is a failed TLS handshake."""
    message = http_answers.tls_refusal(where, exc, "service")
    if message is not None:
        raise RemoteBackboneError(message) from exc


class RemoteBackbone:
    """Owns the HTTP connection to one inference service: the bearer token, TLS trust, a timeout
    per answer, and retries with exponential backoff on connection errors and 5xx answers.

    A 429 or 409 with ``Retry-After`` (a rate limit, a lockout, a replay in progress) waits that
    long and retries, within the same ``retries`` budget (a wait over ``max_wait`` s is not waited).
    A 429 without it is an exhausted query quota and raises at once, as does every other 4xx (the
    service refusing a request, with its reason). A read timeout is not retried (the service may
    still be computing). Every POST carries an ``Idempotency-Key`` that its retries repeat, so a
    retried request is computed and counted once by the service (which remembers keys for 10 min).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        tls: ssl.SSLContext | None = None,
        max_wait: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0 or backoff < 0 or timeout <= 0 or max_wait < 0:
            raise ValueError(
                f"need timeout > 0, retries >= 0, backoff >= 0, max_wait >= 0; got {timeout}, {retries}, "
                f"{backoff}, {max_wait}"
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
            verify=tls if tls is not None else True,
        )
        try:
            self.info = ServiceInfo.model_validate(self._call("GET", "/v1/info"))
        except BaseException:
            self._http.close()
            raise

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
        where = f"{method} {self.url}{path}"
        headers = {IDEMPOTENCY_HEADER: secrets.token_hex(16)} if method == "POST" else {}
        delay = self.backoff
        failure = ""
        for attempt in range(self.retries + 1):
            wait = delay
            try:
                response = self._http.request(method, path, content=body, headers=headers)
            except _RETRIED as exc:
                _raise_on_tls_refusal(where, exc)
                failure = http_answers.transport_failure(self.url, exc)
            except httpx.TimeoutException as exc:
                raise RemoteBackboneError(
                    f"{where} got no answer within {self.timeout} s; raise "
                    "backbone.timeout or send fewer candidates or inputs per request"
                ) from exc
            except httpx.TransportError as exc:  # the connection broke after the request went out
                _raise_on_tls_refusal(where, exc)  # TLS 1.3: a refused client certificate shows here
                raise RemoteBackboneError(
                    f"{where} failed: {http_answers.transport_failure(self.url, exc)}"
                ) from exc
            else:
                if response.is_success:
                    return response.json()
                retry_after = self._retryable(where, response)
                wait = delay if retry_after is None else retry_after
                failure = f"HTTP {response.status_code}: {http_answers.reason(response)}"
            if attempt < self.retries:
                log.warning("%s failed (%s); retry in %.2f s", where, failure, wait)
                self._sleep(wait)
                delay *= 2
        raise RemoteBackboneError(f"{where} failed after {self.retries + 1} attempts; last: {failure}")

    def _retryable(self, where: str, response: httpx.Response) -> float | None:
        """For an answer worth retrying, the seconds the service asked to wait (None: back off as
        usual, a 5xx); raise ``RemoteBackboneError`` for the others, with the service's reason."""
        status, reason = response.status_code, http_answers.reason(response)
        retry_after = http_answers.retry_after(response)
        if status >= 500:
            return None
        if status == 429 and retry_after is None:
            raise RemoteBackboneError(f"{where}: the query quota of this token is exhausted: {reason}")
        if status not in _WAIT_AND_RETRY or retry_after is None:
            raise RemoteBackboneError(f"{where} was refused ({status}): {reason}")
        if retry_after > self.max_wait:
            raise RemoteBackboneError(
                f"{where} was refused ({status}) and told to wait {retry_after:.0f} s, "
                f"over the {self.max_wait:.0f} s this client waits: {reason}"
            )
        return retry_after


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
        floats = projection.num_tokens * info.hidden_size * projection.dim
        if info.max_projection_floats is not None and floats > info.max_projection_floats:
            raise RemoteBackboneError(
                f"the projection of {projection.num_tokens} prompt tokens × hidden {info.hidden_size} × dim "
                f"{projection.dim} = {floats} floats is over the service's limit of "
                f"{info.max_projection_floats}: lower prompt.num_tokens or prompt.dim, or ask the model "
                "owner for a larger --max-projection-floats"
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
