"""The HTTP client of an OpenAI-compatible server (vLLM, llama.cpp's server, a hosted API).

One ``httpx.Client`` per server, shared by the threads that keep up to ``concurrency`` requests in
flight. A request that fails before an answer (connection refused or dropped), or is answered 429
(rate limited) or 5xx (overloaded, restarting), is retried up to ``retries`` times: after the
``Retry-After`` the server asked for (seconds or an HTTP date; one over ``max_wait`` fails at once,
naming it), else after an exponential backoff (``backoff`` doubling up to ``max_backoff``). A read
timeout is not retried (the server may still be computing, and a retry would pay twice), nor is a
connection that broke after the request went out, nor any other 4xx: each fails with the server's own
reason. A failed TLS handshake fails at once, naming the field to set: ``ca_file`` for a server
certificate that does not verify, ``client_certfile``/``client_keyfile`` for a server that refused
this party's client certificate (or its absence). Every answered request's ``usage`` (prompt and
completion tokens, as the server counts them) is added to the client's counters.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from prompt_modules import http_answers

log = logging.getLogger("prompt_modules.openai_client")

_RETRIED_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.WriteError)
"""Failures before the server answered (or as it dropped the connection): worth a retry."""
_RETRIED_STATUS = (408, 429)
"""4xx answers that say "not now" rather than "not this": retried like a 5xx."""


class ServerError(RuntimeError):
    """The server could not be reached, did not answer in time, or refused a request; the message
    says which, with the server's own reason for a refusal."""


@dataclass(frozen=True)
class EndpointSettings:
    """Where the server is and how the client treats it (see the module docstring)."""

    url: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_wait: float = 300.0
    concurrency: int = 4
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        numbers = {
            "timeout": self.timeout,
            "retries": self.retries,
            "backoff": self.backoff,
            "max_backoff": self.max_backoff,
            "max_wait": self.max_wait,
        }
        bad = {name: value for name, value in numbers.items() if value < 0}
        if bad or self.timeout <= 0 or self.concurrency < 1:
            raise ValueError(f"need timeout > 0, concurrency >= 1 and the rest >= 0; got {numbers}")


@dataclass
class UsageCounters:
    """What a client has asked a server for, in the server's own units: requests answered, prompt
    and completion tokens (the answers' ``usage``), and retries. Thread-safe."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(
        self, requests: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0, retries: int = 0
    ) -> None:
        with self._lock:
            self.requests += requests
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.retries += retries

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "retries": self.retries,
            }


class OpenAICompatibleClient:
    """Owns the connection to one OpenAI-compatible server: the bearer token, TLS trust, the retry
    policy, the concurrency limit and the usage counters (see the module docstring)."""

    def __init__(
        self,
        settings: EndpointSettings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.usage = UsageCounters()
        self._sleep = sleep
        headers = {"Content-Type": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        limits = httpx.Limits(
            max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
        )
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=settings.timeout,
            transport=transport,
            verify=settings.tls if settings.tls is not None else True,
            limits=limits,
        )
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="openai-client")

    def get(self, path: str) -> Any:
        """GET ``path`` (e.g. ``/v1/models``) with the retry policy."""
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON to ``path`` with the retry policy; the answer, its usage counted."""
        answer = self._call("POST", path, body)
        if not isinstance(answer, dict):
            raise ServerError(f"POST {self.url}{path} answered {type(answer).__name__}, not a JSON object")
        usage = answer.get("usage") or {}
        self.usage.add(
            requests=1,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        return answer

    def post_many(self, path: str, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST every body, up to ``concurrency`` at once; the answers in the bodies' order. The first
        failure is raised once every request in flight has ended (nothing is left running)."""
        if len(bodies) <= 1 or self.settings.concurrency == 1:
            return [self.post(path, body) for body in bodies]
        futures = [self._pool.submit(self.post, path, body) for body in bodies]
        errors = [f.exception() for f in futures]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        where = f"{method} {self.url}{path}"
        settings = self.settings
        delay = settings.backoff
        failure = ""
        for attempt in range(settings.retries + 1):
            wait = delay
            try:
                response = self._http.request(method, path, json=body)
            except _RETRIED_ERRORS as exc:
                _raise_on_tls_refusal(where, exc)
                failure = http_answers.transport_failure(self.url, exc)
            except httpx.TimeoutException as exc:
                raise ServerError(
                    f"{where} got no answer within {settings.timeout} s; raise backbone.timeout or lower "
                    "backbone.concurrency"
                ) from exc
            except httpx.TransportError as exc:  # the connection broke after the request went out
                _raise_on_tls_refusal(where, exc)  # TLS 1.3: a refused client certificate shows here
                raise ServerError(f"{where} failed: {http_answers.transport_failure(self.url, exc)}") from exc
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise ServerError(f"{where} answered with something that is not JSON: {exc}") from exc
                wait = self._wait_for(where, response, delay)
                failure = f"HTTP {response.status_code}: {http_answers.reason(response)}"
            if attempt < settings.retries:
                log.warning("%s failed (%s); retry %d in %.2f s", where, failure, attempt + 1, wait)
                self.usage.add(retries=1)
                self._sleep(wait)
                delay = min(delay * 2, settings.max_backoff)
        raise ServerError(f"{where} failed after {settings.retries + 1} attempts; last: {failure}")

    def _wait_for(self, where: str, response: httpx.Response, delay: float) -> float:
        """Seconds to wait before retrying an answer worth retrying (its Retry-After, else ``delay``);
        ServerError with the server's reason for one that is not."""
        status = response.status_code
        if status < 500 and status not in _RETRIED_STATUS:
            hint = " (check backbone.token_env)" if status in (401, 403) else ""
            raise ServerError(f"{where} was refused ({status}){hint}: {http_answers.reason(response)}")
        wait = http_answers.retry_after(response)
        if wait is None:
            return delay
        if wait > self.settings.max_wait:
            raise ServerError(
                f"{where} was answered {status} and told to wait {wait:.0f} s, over the "
                f"{self.settings.max_wait:.0f} s this client waits (backbone.max_wait): "
                f"{http_answers.reason(response)}"
            )
        return wait


def _raise_on_tls_refusal(where: str, exc: httpx.TransportError) -> None:
    """ServerError naming the TLS field to set when ``exc`` is a failed TLS handshake."""
    message = http_answers.tls_refusal(where, exc, "server")
    if message is not None:
        raise ServerError(message) from exc
