"""A long-lived process per site that keeps the experiment (frozen backbone, tokenised data) for
the short-lived ClientApp processes of Flower's deployment engine.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, so
without help each message loads the backbone and tokenises the site's data again. A site that
runs ``fedprompt flower site-worker --socket PATH`` and names that socket in its SuperNode's node
config (``--node-config "partition-id=0 site-worker='PATH'"``) has its ClientApp hand each train
and evaluate message to this process instead: the backbone is loaded once per site and reused by
every round, and the ClientApp process only relays bytes.

The ClientApp still checks everything Flower delivered (records, payload size, instructions)
before it relays; the worker checks every request again, since it trusts no peer: the
configuration is validated by pydantic, the instructions by the same reader as a Flower record,
the payload by fedprompt's decoders against the experiment's specs. Each connection is read in
its own thread, within ``read_timeout`` seconds for the whole request (a peer that connects and
sends nothing, or trickles bytes, gets an error reply when its time is up and blocks no one
else); the work itself runs one request at a time under one lock (the experiment is not
thread-safe). A failure is answered with its message, which the ClientApp raises so the
ServerApp logs the client as failed and the round goes on.

Wire format, both directions: a 4-byte big-endian header length, the header as UTF-8 JSON, an
8-byte big-endian body length, and the body (safetensors bytes, or nothing). Nothing is pickled.
The socket is a Unix domain socket that only its owner may open (mode 0600).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from pydantic import ValidationError

from fedprompt.config import RunConfig
from fedprompt.errors import PayloadError
from fedprompt.federation.instructions import FitInstructions
from fedprompt.flower.records import INSTRUCTIONS_RECORD, instructions_record, read_instructions

log = logging.getLogger("fedprompt.flower")

SITE_WORKER = "site-worker"
"""The SuperNode's ``--node-config`` key naming the site worker's socket."""
MAX_HEADER_BYTES = 4 * 2**20
"""Largest JSON header accepted (a resolved configuration is a few kilobytes)."""
READ_TIMEOUT = 60.0
"""Seconds a peer has to send its whole request (and to take its reply) before the worker gives up."""
_HEADER_LENGTH = struct.Struct(">I")
_BODY_LENGTH = struct.Struct(">Q")


class SiteWorkerError(RuntimeError):
    """The site worker could not be reached, or answered that a request failed (with why)."""


class RequestTimeout(PayloadError):
    """A peer did not send its whole request within the worker's read timeout."""


@dataclass(frozen=True)
class Frame:
    """One message on the socket: a JSON header and a body of bytes."""

    header: dict[str, Any]
    body: bytes = b""

    def send(self, sock: socket.socket) -> None:
        header = json.dumps(self.header).encode()
        sock.sendall(_HEADER_LENGTH.pack(len(header)) + header + _BODY_LENGTH.pack(len(self.body)))
        if self.body:
            sock.sendall(self.body)

    @classmethod
    def receive(
        cls, sock: socket.socket, max_body: int | None = None, deadline: float | None = None
    ) -> Frame:
        """Read one frame; PayloadError when a length is over its limit or the header is not JSON.

        ``max_body`` None reads the header only and leaves the body length to :meth:`receive_body`.
        With a ``deadline`` (``time.monotonic()`` seconds) the whole read must end by then, or
        :class:`RequestTimeout`; without one, the socket's own timeout applies to each read.
        """
        (size,) = _HEADER_LENGTH.unpack(_read_exactly(sock, _HEADER_LENGTH.size, deadline))
        if size > MAX_HEADER_BYTES:
            raise PayloadError(f"frame header is {size} bytes, over the limit of {MAX_HEADER_BYTES}")
        try:
            header = json.loads(_read_exactly(sock, size, deadline))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PayloadError(f"frame header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise PayloadError(f"frame header must be a JSON object, got {type(header).__name__}")
        frame = cls(header)
        return frame if max_body is None else frame.receive_body(sock, max_body, deadline)

    def receive_body(self, sock: socket.socket, max_body: int, deadline: float | None = None) -> Frame:
        (size,) = _BODY_LENGTH.unpack(_read_exactly(sock, _BODY_LENGTH.size, deadline))
        if size > max_body:
            raise PayloadError(f"frame body is {size} bytes, over the limit of {max_body} bytes")
        return Frame(self.header, _read_exactly(sock, size, deadline))


def _read_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(left)
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(left, 2**20))
        except TimeoutError:
            if deadline is None:
                raise
            raise _timed_out(left) from None
        if not chunk:
            raise ConnectionError(f"the peer closed the connection with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _timed_out(missing: int) -> RequestTimeout:
    return RequestTimeout(f"the request was not complete within the read timeout ({missing} bytes missing)")


class SiteWorkerClient:
    """The ClientApp's side: one request per connection to the site worker at ``socket_path``."""

    def __init__(self, socket_path: str | Path, timeout: float) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def fit(self, config: RunConfig, partition: int, instructions: FitInstructions, downlink: bytes) -> bytes:
        """The update's safetensors bytes for the global state ``downlink``."""
        record = instructions_record(partition, instructions)
        reply = self._request(
            {"op": "train", "config": config.model_dump_json(), "instructions": dict(record)},
            downlink,
            config.payload.max_bytes,
        )
        return reply.body

    def evaluate(
        self, config: RunConfig, partition: int, accepted_round: int, state: bytes
    ) -> dict[str, float] | None:
        """The partition's local metrics for ``state`` (accuracy, loss, example count, personal
        accuracies), or None (no held-out split)."""
        header = {
            "op": "evaluate",
            "config": config.model_dump_json(),
            "partition": partition,
            "accepted_round": accepted_round,
        }
        reply = self._request(header, state, 0)
        return reply.header.get("metrics")

    def status(self) -> dict[str, Any]:
        """The worker's counters: experiments built, requests served and failed, its process id."""
        return self._request({"op": "status"}, b"", 0).header["status"]

    def _request(self, header: dict[str, Any], body: bytes, max_reply_body: int) -> Frame:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                raise SiteWorkerError(
                    f"cannot reach the site worker at {self.socket_path} ({exc}); start it on this "
                    f"site with `fedprompt flower site-worker --socket {self.socket_path}`, or drop "
                    f"{SITE_WORKER!r} from the SuperNode's --node-config"
                ) from None
            try:
                with contextlib.suppress(OSError):  # a worker that rejects a request stops reading;
                    Frame(header, body).send(sock)  # its reply says why
                reply = Frame.receive(sock, max_reply_body)
            except (OSError, PayloadError) as exc:
                raise SiteWorkerError(f"site worker at {self.socket_path}: {exc}") from None
        if not reply.header.get("ok"):
            raise SiteWorkerError(f"site worker at {self.socket_path}: {reply.header.get('error')}")
        return reply


class SiteWorker:
    """Owns one site's long-lived experiment cache, its clients' carried states and its ledger of
    releases (in memory, or in ``state_dir`` so they survive a restart of the worker), the Unix
    socket it serves on, the lock
    that runs one piece of work at a time, and its counters.

    ``serve_forever`` reads each connection in its own thread (the whole request within
    ``read_timeout`` seconds) until ``shutdown`` (from another thread) or a signal ends it;
    ``warm_up`` builds an experiment before the first request.
    """

    def __init__(
        self, socket_path: str | Path, state_dir: str | Path | None = None, read_timeout: float = READ_TIMEOUT
    ) -> None:
        from fedprompt.federation.client_state import (  # worker side only
            DirectoryClientStates,
            MemoryClientStates,
        )
        from fedprompt.federation.privacy.ledger import FileLedger, MemoryLedger
        from fedprompt.flower.site import ExperimentCache

        if not read_timeout > 0:
            raise ValueError(f"read_timeout must be a positive number of seconds, got {read_timeout}")
        self.socket_path = Path(socket_path)
        self.read_timeout = read_timeout
        self.cache = ExperimentCache()
        self.states = DirectoryClientStates(state_dir) if state_dir is not None else MemoryClientStates()
        self.ledger = FileLedger(state_dir) if state_dir is not None else MemoryLedger()
        """What the site has released (a file in ``state_dir``, which local DP needs)."""
        self.counters = dict.fromkeys(("requests", "failed", "timed_out", "train", "evaluate", "status"), 0)
        """Connections served, requests that failed (of which timed out), and answers per op."""
        self._work = threading.Lock()
        self._count_lock = threading.Lock()
        self._server = _UnixServer(self.socket_path, self)

    def warm_up(self, config: RunConfig) -> None:
        """Build ``config``'s experiment now, so the first round does not wait for it."""
        with self._work:
            self.cache.get(config)

    def serve_forever(self) -> None:
        log.info("site worker serving on %s (pid %d)", self.socket_path, os.getpid())
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()
            self.socket_path.unlink(missing_ok=True)

    def shutdown(self) -> None:
        self._server.shutdown()

    def status(self) -> dict[str, Any]:
        """The counters, the experiments built and this process's id."""
        with self._count_lock:
            counters = dict(self.counters)
        return {**counters, "experiments_built": self.cache.builds, "pid": os.getpid()}

    def handle(self, sock: socket.socket) -> None:
        """Answer one request on ``sock`` (in the connection's own thread); every failure becomes an
        error reply, never a crash. The reply, too, must be taken within the read timeout."""
        self._count("requests")
        try:
            op, request, config = self._read(sock, time.monotonic() + self.read_timeout)
        except ConnectionError as exc:  # the peer left before its request was complete: no one to answer
            log.warning("site worker: a peer left mid-request: %s", exc)
            return
        except (PayloadError, ValidationError) as exc:  # a timeout, too
            if isinstance(exc, RequestTimeout):
                self._count("timed_out")
            reply = self._failure(exc)
        else:
            reply = self._answer_safely(op, request, config)
        sock.settimeout(self.read_timeout)
        reply.send(sock)

    def _answer_safely(self, op: str, request: Frame, config: RunConfig | None) -> Frame:
        try:
            return self._answer(op, request, config)
        except (PayloadError, ValidationError, ValueError, KeyError, TypeError) as exc:
            return self._failure(exc)
        except Exception as exc:  # a failing fit must not end the worker: report it to the client
            log.exception("site worker request failed")
            return self._failure(exc)

    def _count(self, name: str) -> None:
        with self._count_lock:
            self.counters[name] += 1

    def _failure(self, exc: BaseException) -> Frame:
        self._count("failed")
        log.warning("site worker rejected a request: %s", exc)
        return Frame({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _read(self, sock: socket.socket, deadline: float) -> tuple[str, Frame, RunConfig | None]:
        """(op, the whole request, its configuration) read by ``deadline``; cheap checks first, so a
        request that is wrong in its header is refused before its body is read."""
        request = Frame.receive(sock, None, deadline)
        op = request.header.get("op")
        if op == "status":
            return op, request.receive_body(sock, 0, deadline), None
        if op not in ("train", "evaluate"):
            raise PayloadError(f"unknown op {op!r}; expected 'train', 'evaluate' or 'status'")
        config = RunConfig.model_validate_json(_field(request.header, "config", str))
        return op, request.receive_body(sock, config.payload.max_bytes, deadline), config

    def _answer(self, op: str, request: Frame, config: RunConfig | None) -> Frame:
        from fedprompt.flower.site import evaluate_partition, fit_partition  # torch: worker side only

        if op == "status" or config is None:
            self._count("status")
            return Frame({"ok": True, "status": self.status()})
        if op == "train":
            fields = _field(request.header, "instructions", dict)
            partition, instructions = read_instructions(
                RecordDict({INSTRUCTIONS_RECORD: ConfigRecord(fields)})
            )
            _check_partition(partition, config)
            with self._work:
                hosted = self.cache.get(config)
                uplink = fit_partition(
                    hosted, partition, instructions, request.body, self.states, self.ledger
                )
            self._count("train")
            return Frame({"ok": True}, uplink)
        partition = _field(request.header, "partition", int)
        _check_partition(partition, config)
        accepted_round = _field(request.header, "accepted_round", int)
        if accepted_round < 0:
            raise PayloadError(f"request field 'accepted_round' must be >= 0, got {accepted_round}")
        with self._work:
            metrics = evaluate_partition(
                self.cache.get(config), partition, accepted_round, request.body, self.states
            )
        self._count("evaluate")
        return Frame({"ok": True, "metrics": metrics})


def _field(header: Mapping[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PayloadError(f"request field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _check_partition(partition: int, config: RunConfig) -> None:
    if not 0 <= partition < config.partition.num_clients:
        raise PayloadError(
            f"partition {partition} is outside 0..{config.partition.num_clients - 1} of this configuration"
        )


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix stream server (owner-only socket) that hands each connection, in a thread of its own,
    to its SiteWorker. The threads are daemons: a peer that never finishes cannot hold up shutdown."""

    daemon_threads = True

    def __init__(self, path: Path, worker: SiteWorker) -> None:
        if path.exists():
            if not path.is_socket():
                raise FileExistsError(f"{path} exists and is not a socket; choose another --socket path")
            if _listening(path):
                raise FileExistsError(f"a site worker already serves on {path}")
            path.unlink()  # left behind by a worker that was killed
        if not path.parent.is_dir():
            raise FileNotFoundError(f"the folder of --socket {path} does not exist; create it first")
        self.worker = worker
        old_umask = os.umask(0o177)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old_umask)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            self.server.worker.handle(self.request)
        except OSError as exc:
            log.warning("site worker lost a client: %s", exc)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def serve(
    socket_path: str | Path,
    config: RunConfig | None = None,
    state_dir: str | Path | None = None,
    read_timeout: float = READ_TIMEOUT,
) -> None:
    """Run a site worker on ``socket_path`` until SIGINT or SIGTERM, warmed with ``config`` if given,
    keeping its clients' carried states in ``state_dir`` (or in memory).

    Either signal ends it cleanly: the request in progress is abandoned and the socket removed.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    worker = SiteWorker(socket_path, state_dir, read_timeout)
    if config is not None:
        worker.warm_up(config)
    worker.serve_forever()
