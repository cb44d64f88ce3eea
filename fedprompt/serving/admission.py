"""Who may send a request now: request rates per client, lockout after failed tokens, replays.

Everything here reads time from an injected clock (seconds, monotonic), so tests drive time
explicitly instead of sleeping. Refusals carry the seconds after which a retry can succeed, which
the HTTP layer sends as ``Retry-After``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedprompt.errors import ConfigError

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never go back (``time.monotonic``)."""


class Refused(Exception):
    """A request refused for now; ``retry_after`` (seconds, None: not by waiting) says when to retry."""

    def __init__(self, status: int, detail: str, retry_after: float | None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """``Retry-After`` in whole seconds (at least 1), rounded up, when waiting helps."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


@dataclass(frozen=True)
class AdmissionSettings:
    """Request rates, failed-token lockout and replay memory of the service.

    ``rate`` requests per second per client (token bucket of ``burst`` requests; 0: no limit, asked
    for by name). After ``max_failures`` failed tokens in a row from one address, that address is
    locked out for ``lockout`` seconds, doubled with each further failure up to ``max_lockout``; a
    valid token clears its count. The address is the connection's peer, or, when that peer is one of
    ``trusted_proxies`` (addresses or networks), the client address the proxy appended to
    ``X-Forwarded-For`` (the rightmost one not itself a trusted proxy). Results of requests sent with
    an ``Idempotency-Key`` are kept for ``replay_ttl`` seconds (at most ``replay_entries`` per
    client), so a retried request is answered again without being computed or counted twice.
    """

    rate: float = 50.0
    burst: int = 100
    max_failures: int = 5
    lockout: float = 1.0
    max_lockout: float = 300.0
    tracked_addresses: int = 10_000
    replay_ttl: float = 600.0
    replay_entries: int = 16
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            _networks(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"--trusted-proxy: {exc}") from None
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ConfigError(f"rate must be a finite number >= 0 (0: no limit), got {self.rate}")
        counts = ("burst", "max_failures", "tracked_addresses", "replay_entries")
        times = ("lockout", "max_lockout", "replay_ttl")
        bad = {n: getattr(self, n) for n in counts + times if not getattr(self, n) > 0}
        if bad:
            raise ConfigError(f"admission settings must be positive, got {bad}")
        if self.max_lockout < self.lockout:
            raise ConfigError(f"max_lockout ({self.max_lockout}) is below lockout ({self.lockout})")

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The address a request comes from: ``peer``, or behind a trusted proxy the rightmost
        address of ``X-Forwarded-For`` that is not a trusted proxy (a client cannot forge what a
        trusted proxy appended; anything left of it may be forged)."""
        if not self._trusted(peer) or not forwarded_for:
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in _networks(self.trusted_proxies))


@functools.lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


class RateLimiter:
    """Owns one token bucket per client: ``rate`` requests per second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at time)
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        """Spend one request of ``client``'s bucket, or raise ``Refused`` (429) with the wait."""
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise Refused(
                    429,
                    f"client {client!r} is over its rate of {self.rate:g} requests per second "
                    f"(bursts of {self.burst}); retry after {wait:.3g} s",
                    wait,
                )
            self._buckets[client] = (tokens - 1.0, now)


class FailedTokenGuard:
    """Owns the count of failed tokens per client address and the lockouts they earned.

    Remembers at most ``tracked_addresses`` addresses (the least recently seen are forgotten).
    """

    def __init__(self, settings: AdmissionSettings, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (failures, until)
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """Raise ``Refused`` (429) while ``address`` is locked out."""
        with self._lock:
            _, until = self._entries.get(address, (0, 0.0))
            wait = until - self._clock()
            if wait > 0:
                raise Refused(
                    429,
                    f"too many invalid tokens from {address}; locked out for another {wait:.3g} s",
                    wait,
                )

    def failed(self, address: str) -> None:
        """Count a failed token from ``address``; from ``max_failures`` on, lock it out (doubling)."""
        s = self.settings
        with self._lock:
            failures, until = self._entries.pop(address, (0, 0.0))
            failures += 1
            if failures >= s.max_failures:
                doublings = min(failures - s.max_failures, 64)
                until = self._clock() + min(s.max_lockout, s.lockout * 2.0**doublings)
            self._entries[address] = (failures, until)
            while len(self._entries) > s.tracked_addresses:
                self._entries.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """A valid token from ``address`` clears its failures."""
        with self._lock:
            self._entries.pop(address, None)


@dataclass(frozen=True)
class _Replay:
    body_sha256: str
    answer: Any
    expires: float


class ReplayCache:
    """Owns the answers to requests sent with an ``Idempotency-Key``, per client, for a bounded time.

    A client's retry of a request whose answer was lost (a dropped connection, a 5xx after the
    work was done) gets the stored answer: computed and counted once. A key reused with another
    body is refused (422); the same key while its first request still runs gets 409 and a retry time.
    """

    IN_PROGRESS = object()

    def __init__(self, ttl: float, entries: int, clock: Clock) -> None:
        self.ttl = ttl
        self.entries = entries
        self._clock = clock
        self._store: dict[str, OrderedDict[str, _Replay]] = {}
        self._lock = threading.Lock()

    def begin(self, client: str, key: str, body: bytes) -> Any:
        """The stored answer of ``(client, key)``, or None after marking the key as in progress."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            now = self._clock()
            store = self._store.setdefault(client, OrderedDict())
            for old in [k for k, entry in store.items() if entry.expires <= now]:
                del store[old]
            entry = store.get(key)
            if entry is not None:
                if entry.body_sha256 != digest:
                    raise Refused(
                        422, "Idempotency-Key was already used with another request body; use a new key", None
                    )
                if entry.answer is self.IN_PROGRESS:
                    raise Refused(409, "a request with this Idempotency-Key is still being answered", 1.0)
                return entry.answer
            store[key] = _Replay(digest, self.IN_PROGRESS, now + self.ttl)
            while len(store) > self.entries:
                store.popitem(last=False)
            return None

    def finish(self, client: str, key: str, answer: Any) -> None:
        """Store the answer of ``(client, key)`` (None: the request failed; forget the key)."""
        with self._lock:
            store = self._store.get(client, OrderedDict())
            entry = store.pop(key, None)
            if entry is not None and answer is not None:
                store[key] = _Replay(entry.body_sha256, answer, self._clock() + self.ttl)


class Admission:
    """Owns the service's admission state: the rate limiter, the failed-token guard and the replays."""

    def __init__(self, settings: AdmissionSettings | None = None, clock: Clock = time.monotonic) -> None:
        self.settings = settings or AdmissionSettings()
        self.rates = RateLimiter(self.settings.rate, self.settings.burst, clock)
        self.tokens = FailedTokenGuard(self.settings, clock)
        self.replays = ReplayCache(self.settings.replay_ttl, self.settings.replay_entries, clock)
