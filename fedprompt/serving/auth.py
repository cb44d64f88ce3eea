"""Bearer-token authentication of the inference service's clients."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from fastapi import HTTPException

from fedprompt.errors import ConfigError

MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """Client name -> token from ``name:token[,name:token...]`` (e.g. an environment variable's value).

    Raises ValueError naming ``source`` when the text is empty or malformed, a name repeats, or a
    token is shorter than 16 characters.
    """
    tokens: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, token = item.partition(":")
        if not sep or not _NAME.fullmatch(name):
            raise ConfigError(
                f"{source}: entries are name:token with a name of letters, digits, '.', '_', '-'"
            )
        if name in tokens:
            raise ConfigError(f"{source}: client {name!r} appears more than once")
        tokens[name] = token
    if not tokens:
        raise ConfigError(f"{source} holds no tokens; set it to name:token[,name:token...]")
    return check_tokens(tokens, source)


def check_tokens(tokens: Mapping[str, str], source: str) -> dict[str, str]:
    """The tokens, after refusing short ones and one token shared by two clients."""
    short = sorted(name for name, token in tokens.items() if len(token) < MIN_TOKEN_LENGTH)
    if short:
        raise ConfigError(f"{source}: the tokens of {short} are shorter than {MIN_TOKEN_LENGTH} characters")
    if len(set(tokens.values())) != len(tokens):
        raise ConfigError(f"{source}: two clients share a token; give each its own")
    return dict(tokens)


class TokenAuth:
    """Owns the clients' bearer tokens and tells which client an ``Authorization`` header belongs to,
    comparing against every token in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(name, token.encode()) for name, token in check_tokens(tokens, "tokens").items()]

    def client(self, header: str | None) -> str:
        """The client name, or HTTP 401 saying what is wrong with the header."""
        if not header:
            raise _unauthorized("missing Authorization header; send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        given = token.strip().encode()
        found = None
        for name, secret in self._tokens:
            if hmac.compare_digest(given, secret):
                found = name
        if found is None:
            raise _unauthorized("the bearer token is not valid")
        return found


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
