"""The HTTP API of the inference service (FastAPI): authentication, size limits, validation, routes.

Routes: ``GET /v1/health`` (no token), and with ``Authorization: Bearer <token>``: ``GET /v1/info``,
``GET /v1/usage`` (the caller's own counters), ``POST /v1/logits`` and ``POST /v1/losses``. There is
no route that returns a weight or a gradient, and no interactive docs or schema routes. Every
refusal is a 4xx whose ``detail`` says what is wrong: 401 token, 413 size, 400 not JSON, 422 a
field (its path and the problem).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from fedprompt.serving.auth import TokenAuth
from fedprompt.serving.service import InferenceService, RequestError
from prompt_modules.remote_schema import (
    LogitsRequest,
    LogitsResponse,
    LossRequest,
    LossResponse,
    ServiceInfo,
    Usage,
)

log = logging.getLogger("fedprompt.serving")

ROUTES = ("/v1/health", "/v1/info", "/v1/usage", "/v1/logits", "/v1/losses")
_MAX_ERRORS = 5
Model = TypeVar("Model", bound=BaseModel)


def _client_name(request: Request) -> str:
    """The authenticated client of a request (HTTP 401 otherwise)."""
    return request.app.state.auth.client(request.headers.get("authorization"))


Client = Annotated[str, Depends(_client_name)]


def create_app(service: InferenceService, tokens: Mapping[str, str]) -> FastAPI:
    """The FastAPI app serving ``service`` to the clients named in ``tokens`` (name -> bearer token)."""
    app = FastAPI(title="fedprompt inference service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.auth = TokenAuth(tokens)
    limit = service.limits.max_request_bytes

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    def info(client: Client) -> ServiceInfo:
        return service.info

    @app.get("/v1/usage")
    def usage(client: Client) -> Usage:
        return service.usage(client)

    @app.post("/v1/logits")
    async def logits(request: Request, client: Client) -> LogitsResponse:
        parsed = _parse(LogitsRequest, await _body(request, limit))
        return await _run(service.logits, client, parsed)

    @app.post("/v1/losses")
    async def losses(request: Request, client: Client) -> LossResponse:
        parsed = _parse(LossRequest, await _body(request, limit))
        return await _run(service.losses, client, parsed)

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(
            413,
            f"the request body is {declared} bytes; the limit is {limit}: send fewer candidates or inputs",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(
                413,
                f"the request body is over the limit of {limit} bytes",
            )
    return bytes(body)


def _parse(model: type[Model], body: bytes) -> Model:
    """The body validated as ``model``; 400 for bad JSON, 422 naming the first fields that are wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise HTTPException(400, f"the request body is not valid JSON: {errors[0]['msg']}") from None
        lines = [f"{_field(err['loc'])}: {err['msg']}" for err in errors[:_MAX_ERRORS]]
        more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
        raise HTTPException(422, "; ".join(lines) + more) from None


def _field(loc: tuple[str | int, ...]) -> str:
    """A validation error's location as a path: ``z[0][3]``, ``projection.dim``."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return path or "body"


async def _run(method: Callable[[str, Model], BaseModel], client: str, request: Model) -> BaseModel:
    """Run a service call off the event loop; a ``RequestError`` becomes a 422 with its message."""
    try:
        return await run_in_threadpool(method, client, request)
    except RequestError as exc:
        log.info("refused a request of client %r: %s", client, exc)
        raise HTTPException(422, str(exc)) from None
