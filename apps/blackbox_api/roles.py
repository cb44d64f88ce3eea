"""The federation server and the data owners' clients of the black-box API app, each a process of
its own that starts the Flower processes its role needs with the right configuration.

- ``run_server``: a Flower SuperLink, the Flower app written from the configuration
  (``fedprompt flower new-app``), ``flwr run`` of it; waits for the run to end, stops the SuperLink
  and returns the run folder (global metrics, per-client bytes and queries).
- ``run_client``: one site: a fedprompt site worker (the tokenised data and the connection to the
  inference service, kept for the whole run) and a Flower SuperNode that hosts partition N and
  hands each message to that worker. Runs until interrupted, as a SuperNode does.

Both read the same fedprompt configuration (a remote backbone: the model stays with its owner);
paths in it (data files, ``backbone.ca_file``) are resolved in each party's working folder.
Each party's bearer token for the inference service is in the environment variable that
``backbone.token_env`` names; the server's is used for the global evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from apps.blackbox_api.processes import FEDPROMPT, ProcessError, Processes, executable, interrupted_by_signals
from fedprompt.config import ConfigError, RunConfig, load_config
from fedprompt.execution.results import SUMMARY_FILE
from fedprompt.flower.site_worker import SiteWorkerClient, SiteWorkerError
from fedprompt.flower.template import new_app

log = logging.getLogger("apps.blackbox_api")

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""No telemetry, no update check, no installing the app's dependencies at run time."""


def flower_env(**extra: str) -> dict[str, str]:
    """This process's environment for Flower's processes: ``FLOWER_ENV``, and this interpreter's
    scripts first on PATH (the SuperLink and SuperNode start ``flower-superexec`` and
    ``flwr-clientapp`` by name)."""
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path, **extra}


WORKER_START_TIMEOUT = 600.0
"""Seconds a site worker may take to load the data and reach the service before it serves."""
CONNECTION = "blackbox"
"""The SuperLink connection's name in the server's private ``FLWR_HOME/config.toml``."""


@dataclass(frozen=True)
class FlowerTLS:
    """TLS of the Flower link: the CA certificate every party trusts and, on the server, the
    SuperLink's certificate and key (None: ``--insecure``, for trials only)."""

    ca_certfile: Path
    certfile: Path | None = None
    keyfile: Path | None = None

    def superlink_args(self) -> list[str]:
        if self.certfile is None or self.keyfile is None:
            raise ValueError("the SuperLink needs --ssl-certfile and --ssl-keyfile beside --ssl-ca-certfile")
        return [
            "--ssl-ca-certfile",
            str(self.ca_certfile),
            "--ssl-certfile",
            str(self.certfile),
            "--ssl-keyfile",
            str(self.keyfile),
        ]


API_BACKBONES = ("remote", "vllm", "openai")
"""The backbones this app reaches the model through: its owner's server (fedprompt serve, vLLM, any
OpenAI-compatible API such as llama.cpp's server or a hosted one)."""


def app_config(config: Path, overrides: Sequence[str]) -> RunConfig:
    """The run's configuration, checked for this app: a backbone behind an API, a black-box
    optimiser, and this party's token in the environment (where the server asks for one).
    ConfigError naming the field otherwise."""
    cfg = load_config(config, overrides)
    if cfg.backbone.kind not in API_BACKBONES:
        raise ConfigError(
            f"backbone.kind is {cfg.backbone.kind!r}; the black-box API app reaches the model only through "
            f"its owner's server: set backbone.kind to one of {list(API_BACKBONES)} and backbone.url to its "
            "address"
        )
    token_env = cfg.backbone.token_env
    if token_env is not None and not os.environ.get(token_env, "").strip():
        raise ConfigError(
            f"backbone.token_env: the environment variable {token_env} is empty or unset; "
            "put this party's bearer token for the inference service in it"
        )
    return cfg


def run_server(
    config: Path,
    overrides: Sequence[str] = (),
    *,
    host: str = "0.0.0.0",
    port: int = 9093,
    tls: FlowerTLS | None = None,
    results: Path = Path("runs"),
    workdir: Path = Path(".fedprompt-blackbox/server"),
    round_timeout: float = 600.0,
    node_wait_timeout: float = 600.0,
    timeout: float | None = None,
) -> Path:
    """Run the federation to its end; return the run folder. ProcessError when a Flower process
    fails or ``timeout`` seconds pass."""
    cfg = app_config(config, overrides)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    app_dir = Path(tempfile.mkdtemp(prefix="flower-app-", dir=workdir))
    new_app(app_dir, config, overrides)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    link = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else f"{host}:{port}"
    trust = f'root-certificates = "{tls.ca_certfile.resolve()}"' if tls else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{link}"\n{trust}\n'
    )
    processes = Processes(workdir / "logs", flower_env(FLWR_HOME=str(home)))
    results = results.resolve()
    interrupted_by_signals()
    try:
        processes.start(
            "superlink",
            [
                executable("flower-superlink"),
                "--host",
                host,
                "--port",
                str(port),
                *(tls.superlink_args() if tls else ["--insecure"]),
                "--disable-runtime-dependency-installation",
            ],
        )
        processes.wait_until(
            "superlink", lambda: _healthy(link, tls), timeout=180, what=f"serving on {host}:{port}"
        )
        log.info("SuperLink serving on %s:%d (logs: %s)", host, port, processes.log_dir)
        started = time.time()
        run_config = (
            f"results-dir='{results}' round-timeout={round_timeout} node-wait-timeout={node_wait_timeout}"
        )
        processes.start(
            "flwr-run",
            [executable("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config],
        )
        log.info("run submitted; waiting for %d clients", cfg.partition.num_clients)
        run_dir = _wait_for_run(processes, results, started, timeout)
        log.info("run finished: %s", run_dir)
        return run_dir
    finally:
        processes.stop_all()


def _healthy(link: str, tls: FlowerTLS | None) -> bool:
    """Whether the SuperLink at ``link`` answers its health check."""
    context = ssl.create_default_context(cafile=str(tls.ca_certfile)) if tls else None
    url = f"{'https' if tls else 'http'}://{link}/health"
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as answer:
            return answer.status == 200
    except OSError:
        return False


def _wait_for_run(processes: Processes, results: Path, started: float, timeout: float | None) -> Path:
    """The run folder whose summary appeared after ``started``; ProcessError when ``flwr run`` ended
    without one (after a minute's grace for the ServerApp to write it) or ``timeout`` passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ended_at: float | None = None
    while True:
        done = [p.parent for p in results.glob(f"*/{SUMMARY_FILE}") if p.stat().st_mtime >= started]
        if done:
            return max(done, key=lambda p: p.stat().st_mtime)
        exited = processes.first_exit()
        if exited is not None and ended_at is None:
            ended_at = time.monotonic()
        if ended_at is not None and time.monotonic() - ended_at > 60:
            name, code = exited
            raise ProcessError(
                f"{name} exited ({code}) and no run summary appeared in {results}:\n"
                f"{processes.tail('flwr-run')}\n{processes.tail('superlink')}"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise ProcessError(f"the run did not finish in {timeout:.0f} s:\n{processes.tail('flwr-run')}")
        time.sleep(1.0)


def run_client(
    config: Path,
    overrides: Sequence[str] = (),
    *,
    partition_id: int,
    superlink: str,
    root_certificates: Path | None = None,
    workdir: Path = Path(".fedprompt-blackbox"),
) -> None:
    """Host partition ``partition_id`` until interrupted (SIGINT, SIGTERM); ProcessError when the
    site worker or the SuperNode fails."""
    cfg = app_config(config, overrides)
    if not 0 <= partition_id < cfg.partition.num_clients:
        raise ConfigError(
            f"--partition-id {partition_id} is outside 0..{cfg.partition.num_clients - 1} "
            "(partition.num_clients)"
        )
    workdir = (workdir / f"site-{partition_id}").resolve()
    sockets = Path(tempfile.mkdtemp(prefix="fpbb"))  # short: Unix socket paths are limited to ~100 bytes
    worker_socket = sockets / "site.sock"
    processes = Processes(workdir / "logs", flower_env())
    sets = [arg for item in overrides for arg in ("--set", item)]

    def worker_ready() -> bool:
        # The socket listens before the worker has built the experiment: a connection waits for it.
        with contextlib.suppress(SiteWorkerError):
            SiteWorkerClient(worker_socket, timeout=WORKER_START_TIMEOUT).status()
            return True
        return False

    interrupted_by_signals()
    try:
        worker = [*FEDPROMPT, "flower", "site-worker", "--socket", str(worker_socket)]
        processes.start("site-worker", [*worker, "--config", str(config), *sets])
        processes.wait_until("site-worker", worker_ready, timeout=WORKER_START_TIMEOUT, what="ready")
        log.info("site %d: site worker ready (logs: %s)", partition_id, processes.log_dir)
        trust = ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
        node_config = f"partition-id={partition_id} site-worker='{worker_socket}'"
        processes.start(
            "supernode",
            [
                executable("flower-supernode"),
                "--superlink",
                superlink,
                *trust,
                "--node-config",
                node_config,
                "--port",
                str(_free_port()),
            ],
        )
        log.info("site %d: SuperNode started for %s; serving until interrupted", partition_id, superlink)
        while (exited := processes.first_exit()) is None:
            time.sleep(1.0)
        name, code = exited
        raise ProcessError(f"{name} exited ({code}):\n{processes.tail(name)}")
    except KeyboardInterrupt:
        pass
    finally:
        processes.stop_all()
        shutil.rmtree(sockets, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
