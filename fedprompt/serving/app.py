"""The HTTP API of the inference service (FastAPI): authentication, admission, size limits,
validation, routes.

Routes: ``GET /v1/health`` (no token), and with ``Authorization: Bearer <token>``: ``GET /v1/info``,
``GET /v1/usage`` (the caller's own counters and quota), ``POST /v1/logits`` and ``POST /v1/losses``.
There is no route that returns a weight or a gradient, and no interactive docs or schema routes.
Every refusal is a 4xx whose ``detail`` says what is wrong: 401 token, 413 size, 400 not JSON,
422 a field (its path and the problem), 429 a rate, a lockout or the query quota, 409 a replayed
request still in progress. A 429 that waiting cures (rate, lockout) carries ``Retry-After``; one
for an exhausted query quota does not. Before the token is checked, an address locked out for
repeated invalid tokens is refused (the address behind a trusted proxy, when one is configured);
after it, the client's request rate, and, at the model, how many of its requests are admitted at
once (429 with ``Retry-After``). ``/v1/health`` runs on the event loop, never behind the model. A
POST sent with an ``Idempotency-Key`` header is answered once: a retry with the same key and body
gets the stored answer, computed and counted once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from fedprompt.serving.admission import Admission, Refused
from fedprompt.serving.auth import TokenAuth
from fedprompt.serving.service import InferenceService, QuotaExhausted, RequestError
from prompt_modules.remote_schema import LogitsRequest, LossRequest, ServiceInfo, Usage

log = logging.getLogger("fedprompt.serving")

ROUTES = ("/v1/health", "/v1/info", "/v1/usage", "/v1/logits", "/v1/losses")
IDEMPOTENCY_HEADER = "Idempotency-Key"
_MAX_KEY_LENGTH = 128
_MAX_ERRORS = 5
Model = TypeVar("Model", bound=BaseModel)


def _client_name(request: Request) -> str:
    """The authenticated client of a request, admitted by the lockout and rate checks (401, 429)."""
    admission: Admission = request.app.state.admission
    peer = request.client.host if request.client else "unknown"
    address = admission.settings.client_address(peer, request.headers.get("x-forwarded-for"))
    _admit(admission.tokens.check, address)
    try:
        client = request.app.state.auth.client(request.headers.get("authorization"))
    except HTTPException:
        admission.tokens.failed(address)
        log.warning("invalid token from %s", address)
        raise
    admission.tokens.succeeded(address)
    _admit(admission.rates.take, client)
    return client


def _admit(check: Callable[[str], None], who: str) -> None:
    try:
        check(who)
    except Refused as exc:
        raise HTTPException(exc.status, exc.detail, headers=exc.headers()) from None


Client = Annotated[str, Depends(_client_name)]


def create_app(
    service: InferenceService, tokens: Mapping[str, str], admission: Admission | None = None
) -> FastAPI:
    """The FastAPI app serving ``service`` to the clients named in ``tokens`` (name -> bearer token),
    admitting requests by ``admission`` (no rate limit, the default lockout and replay memory)."""
    app = FastAPI(title="fedprompt inference service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.auth = TokenAuth(tokens)
    app.state.admission = admission or Admission()
    app.state.service = service
    limit = service.limits.max_request_bytes

    @app.get("/v1/health")
    async def health() -> dict[str, str]:  # on the event loop: never behind the model's queue
        return {"status": "ok"}

    @app.get("/v1/info")
    def info(client: Client) -> ServiceInfo:
        return service.info

    @app.get("/v1/usage")
    def usage(client: Client) -> Usage:
        return service.usage(client)

    @app.post("/v1/logits")
    async def logits(request: Request, client: Client) -> JSONResponse:
        return await _answer(request, client, LogitsRequest, service.logits, limit)

    @app.post("/v1/losses")
    async def losses(request: Request, client: Client) -> JSONResponse:
        return await _answer(request, client, LossRequest, service.losses, limit)

    return app


async def _answer(
    request: Request,
    client: str,
    model: type[Model],
    method: Callable[[str, Model], BaseModel],
    limit: int,
) -> JSONResponse:
    """Read, validate and run a POST; with an ``Idempotency-Key``, answer a replay from memory."""
    body = await _body(request, limit)
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 1 <= len(key) <= _MAX_KEY_LENGTH:
        raise HTTPException(422, f"{IDEMPOTENCY_HEADER} must be 1 to {_MAX_KEY_LENGTH} characters")
    replays = request.app.state.admission.replays
    if key is None:
        answer = await _run(method, client, _parse(model, body))
    else:
        try:
            answer = replays.begin(client, key, body)
        except Refused as exc:
            raise HTTPException(exc.status, exc.detail, headers=exc.headers()) from None
        if answer is not None:
            log.info("answered a replay of client %r from memory (key %s)", client, key)
        else:
            try:
                answer = await _run(method, client, _parse(model, body))
            finally:
                replays.finish(client, key, answer)
    response = JSONResponse(answer)
    request.app.state.service.record_transfer(client, len(body), len(response.body))
    return response


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
        lines = [f"{_field(err['loc'])}: {_message(err['msg'])}" for err in errors[:_MAX_ERRORS]]
        more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
        raise HTTPException(422, "; ".join(lines) + more) from None


def _message(msg: str) -> str:
    """A validation message without pydantic's prefix for errors that validators raise."""
    return msg.removeprefix("Value error, ")


def _field(loc: tuple[str | int, ...]) -> str:
    """A validation error's location as a path: ``z[0][3]``, ``projection.dim``."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return path or "body"


async def _run(method: Callable[[str, Model], BaseModel], client: str, request: Model) -> dict:
    """Run a service call off the event loop, as plain JSON data; a ``RequestError`` becomes a 422
    with its message, an exhausted quota a 429 without ``Retry-After`` (waiting does not help)."""
    try:
        return (await run_in_threadpool(method, client, request)).model_dump(mode="json")
    except QuotaExhausted as exc:
        log.warning("client %r: %s", client, exc)
        raise HTTPException(429, str(exc)) from None
    except Refused as exc:  # too many requests of this client admitted at once
        raise HTTPException(exc.status, exc.detail, headers=exc.headers()) from None
    except RequestError as exc:
        log.info("refused a request of client %r: %s", client, exc)
        raise HTTPException(422, str(exc)) from None
