"""Reading an HTTP failure the same way for every server a client talks to: how long the server
asked to wait, its stated reason (in the error shapes of FastAPI and of OpenAI-compatible servers),
and whether a connection failed on an untrusted server certificate or a refused client certificate."""

from __future__ import annotations

import email.utils
import ssl
import time
from typing import Any

import httpx

_RAW_TEXT_CHARS = 300
"""How much of a body that states no reason in a known shape is shown."""


def untrusted_certificate(exc: BaseException) -> bool:
    """Whether a connection failed because the server's certificate did not verify."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_CLIENT_CERTIFICATE_ALERTS = {
    "CERTIFICATE_REQUIRED": "requires a client certificate (mutual TLS) and this party sent none",
    "UNKNOWN_CA": "does not trust the CA that signed this party's client certificate",
    "BAD_CERTIFICATE": "refused this party's client certificate",
    "CERTIFICATE_UNKNOWN": "refused this party's client certificate",
    "CERTIFICATE_EXPIRED": "refused this party's client certificate: it has expired",
    "CERTIFICATE_REVOKED": "refused this party's client certificate: it was revoked",
    "HANDSHAKE_FAILURE": "ended the TLS handshake (as a TLS 1.2 server that requires a client "
    "certificate does when none is sent)",
}
"""The TLS alerts a server sends about the client's certificate (OpenSSL's ``…_ALERT_<NAME>``), and
what each says."""


def client_certificate_refusal(exc: BaseException) -> str | None:
    """What the server's TLS alert said about this party's client certificate (None: no such alert)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).upper()
        for alert, said in _CLIENT_CERTIFICATE_ALERTS.items():
            if f"ALERT_{alert}" in text:
                return said
        seen = seen.__cause__ or seen.__context__
    return None


def tls_refusal(where: str, exc: BaseException, peer: str) -> str | None:
    """The error message naming the TLS field to set when ``exc`` is a failed TLS handshake with
    ``peer`` ("server", "service"): its certificate did not verify, or it refused this party's
    (missing) client certificate; None for any other failure."""
    if untrusted_certificate(exc):
        return (
            f"{where}: the {peer}'s TLS certificate is not trusted ({exc}); set backbone.ca_file to the "
            "certificate of the CA that signed it"
        )
    refusal = client_certificate_refusal(exc)
    if refusal is not None:
        return (
            f"{where}: the {peer} {refusal} ({exc}); set backbone.client_certfile and "
            f"backbone.client_keyfile to a certificate (and its key) signed by a CA the {peer} trusts"
        )
    return None


def transport_failure(url: str, exc: BaseException) -> str:
    """A failed connection to ``url`` in words: the error, and for an https server that closed the
    connection without answering, the hint that one requiring a client certificate does so to a
    party that sent none (without a TLS alert on some servers, uvicorn's)."""
    said = f"{type(exc).__name__}: {exc}"
    if url.startswith("https://") and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        said += (
            " (an https server that requires a client certificate drops a party that sent none: if it "
            "does, set backbone.client_certfile and backbone.client_keyfile)"
        )
    return said


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the service asked to wait (``Retry-After``: seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def reason(response: httpx.Response) -> str:
    """The reason a server gave for an answer that is not a success, as one line for a person: the
    message of an OpenAI-style error body (``{"error": {"message", "type", "code"}}`` as vLLM,
    llama.cpp's server and hosted APIs answer, or vLLM's older flat ``{"object": "error", "message"}``)
    with its type and code, FastAPI's ``{"detail": ...}`` (a string, or validation errors by field),
    else the start of the body's text with its whitespace folded (or the HTTP status phrase for none)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    stated = _stated_reason(body) if isinstance(body, dict) else None
    if stated:
        return stated
    text = " ".join(response.text.split())
    if not text:
        return response.reason_phrase or f"HTTP {response.status_code}"
    return text if len(text) <= _RAW_TEXT_CHARS else text[: _RAW_TEXT_CHARS - 1] + "…"


def _stated_reason(body: dict[str, Any]) -> str | None:
    error = body.get("error")
    if isinstance(error, dict):
        return _openai_error(error)
    if isinstance(error, str) and error.strip():
        return error.strip()
    if "detail" in body:
        return _fastapi_detail(body["detail"])
    if body.get("object") == "error" or "message" in body:
        return _openai_error(body)
    return None


def _openai_error(error: dict[str, Any]) -> str | None:
    message = error.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    kinds = [f"{name} {error[name]}" for name in ("type", "code") if error.get(name) not in (None, "")]
    return f"{message.strip()} ({', '.join(kinds)})" if kinds else message.strip()


def _fastapi_detail(detail: Any) -> str | None:
    if isinstance(detail, list):  # request validation: one {"loc": [...], "msg": ...} per field
        said = [_field_problem(item) for item in detail if isinstance(item, dict)]
        return "; ".join(s for s in said if s) or None
    if detail is None:
        return None
    return str(detail).strip() or None


def _field_problem(item: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in item.get("loc") or ())
    message = str(item.get("msg") or "").strip()
    return f"{where}: {message}" if where and message else where or message
