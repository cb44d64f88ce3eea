"""Run the inference service with uvicorn in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from fedprompt.serving.tls import TLSFiles


@contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0, tls: TLSFiles | None = None
) -> Iterator[str]:
    """Serve ``app`` on ``host``:``port`` (0: a free port) until the block ends; yields the base URL
    (``https`` with ``tls``).

    The socket is bound before the server starts, so the port is known and cannot be taken meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    options = tls.uvicorn_options() if tls else {}
    config = uvicorn.Config(app, log_level="warning", lifespan="off", proxy_headers=False, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the inference service did not start on {host}:{sock.getsockname()[1]}")
            time.sleep(0.02)
        yield f"{'https' if tls else 'http'}://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
