"""Reading an HTTP failure the same way for every server a client talks to: how long the server
asked to wait, its stated reason (in the error shapes of FastAPI and of OpenAI-compatible servers),
and whether a connection failed on an untrusted certificate."""

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
