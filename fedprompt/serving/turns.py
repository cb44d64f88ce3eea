"""Whose request computes next: one compute slot, shared fairly between the service's clients.

The backbone runs one forward pass at a time. Without a rule, whichever waiting thread the lock
wakes goes next, so a client that keeps many requests waiting takes most turns and another
client's request waits behind all of them. :class:`FairTurns` admits at most ``max_pending``
requests per client at once (computing or waiting; one more is refused at once with a retry
time) and hands the slot round-robin between the clients that have a request waiting, the client
served least recently first. A request of a client that is alone waits for nothing; beside a
flooding client it waits for at most the one request in progress.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

from fedprompt.serving.admission import Refused

BUSY_RETRY_AFTER = 1.0
"""Seconds a client over its pending requests is told to wait."""


class FairTurns:
    """Owns the compute slot, each client's waiting requests (a queue of tickets), how many it has
    admitted, and the round-robin order of the clients (least recently served first)."""

    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[object]] = {}
        self._admitted: Counter[str] = Counter()
        self._order: deque[str] = deque()
        self._busy = False

    @contextmanager
    def turn(self, client: str) -> Iterator[None]:
        """Hold the compute slot for one request of ``client``; ``Refused`` (429) at once when the
        client already has ``max_pending`` requests admitted."""
        ticket = object()
        with self._cond:
            if self._admitted[client] >= self.max_pending:
                raise Refused(
                    429,
                    f"client {client!r} has {self._admitted[client]} requests in progress or waiting, the "
                    f"most it may have at once ({self.max_pending}); send the next one when one is answered",
                    BUSY_RETRY_AFTER,
                )
            self._admitted[client] += 1
            self._waiting.setdefault(client, deque()).append(ticket)
            if client not in self._order:
                self._order.appendleft(client)  # never served: first in line among the waiting
            try:
                while self._busy or self._next() is not ticket:
                    self._cond.wait()
            except BaseException:
                self._leave(client, ticket)
                raise
            self._waiting[client].popleft()
            self._order.remove(client)
            self._order.append(client)  # served now: last in line
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._leave(client, None)

    def pending(self, client: str) -> int:
        """How many requests of ``client`` are admitted (computing or waiting)."""
        with self._cond:
            return self._admitted[client]

    def _next(self) -> object | None:
        for client in self._order:
            queue = self._waiting.get(client)
            if queue:
                return queue[0]
        return None

    def _leave(self, client: str, ticket: object | None) -> None:
        """A request of ``client`` is done (or gave up waiting: ``ticket``). Call with the lock held."""
        if ticket is not None:
            self._waiting[client].remove(ticket)
        self._admitted[client] -= 1
        if not self._admitted[client]:
            del self._admitted[client]
            self._waiting.pop(client, None)
            if client in self._order:
                self._order.remove(client)
        self._cond.notify_all()
