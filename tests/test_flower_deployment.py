"""Flower's deployment engine for real: a flower-superlink and two or three flower-supernode processes
on 127.0.0.1 run a tiny fedprompt job; its global prompt must equal the in-process run's.

Every process a test starts gets its own session; the fixture kills each of them, and every
process they started, by process id when the test ends, passed or failed. Telemetry, Flower's
update check and run-time dependency installation are off, and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flower_support import assert_same_history, tiny_config, write_app, write_dataset
from safetensors.torch import load_file
from tls_support import Certificates

import fedprompt
from fedprompt.config import load_config
from fedprompt.execution.results import CLIENTS_FILE, FINAL_PROMPT_FILE
from fedprompt.execution.simulation import run_in_process
from fedprompt.flower.site_worker import SiteWorkerClient, SiteWorkerError
from fedprompt.tasks.registry import build_experiment

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
"""The virtual environment's scripts: flower-superlink, flower-supernode, flwr."""
RUN_TIMEOUT = 420.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (private key, public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


class Cluster:
    """Owns the Flower processes of one test: their logs, ports and shutdown.

    Each process is started in its own session; ``stop`` and ``stop_all`` find it and every
    process below it by process id and end them (SIGTERM, then SIGKILL).
    """

    def __init__(self, folder: Path, certs: Certificates | None = None, node_auth: bool = False) -> None:
        self.folder = folder
        self.certs = certs
        self.node_auth = node_auth
        self.processes: dict[str, subprocess.Popen] = {}
        self.port = _free_port()
        home = folder / "flwr-home"
        home.mkdir(parents=True)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        connection = [f'address = "127.0.0.1:{self.port}"']
        connection.append(f'root-certificates = "{certs.ca}"' if certs else "insecure = true")
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n' + "\n".join(connection) + "\n"
        )

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        with self.log(name).open("w") as log:
            process = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
                env=self.env,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def tls_args(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certs.ca),
            "--ssl-certfile",
            str(self.certs.cert),
            "--ssl-keyfile",
            str(self.certs.key),
        ]

    def start_superlink(self, simulation: bool = False) -> None:
        """A SuperLink on 127.0.0.1; with ``simulation`` it runs Flower's simulation engine itself."""
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port), *self.tls_args()]
        args.append("--disable-runtime-dependency-installation")
        if simulation:
            args.append("--simulation")
        if self.node_auth:
            args.append("--enable-supernode-auth")
        process = self.start("superlink", args)
        scheme = "https" if self.certs else "http"
        context = ssl.create_default_context(cafile=str(self.certs.ca)) if self.certs else None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.tail('superlink')}")
            try:
                with urllib.request.urlopen(
                    f"{scheme}://127.0.0.1:{self.port}/health", timeout=2, context=context
                ) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"flower-superlink not ready in 120 s: {self.tail('superlink')}")

    def start_supernode(self, partition: int, site_worker: Path | None = None) -> None:
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port())]
        args += ["--root-certificates", str(self.certs.ca)] if self.certs else ["--insecure"]
        node_config = f"partition-id={partition}"
        if site_worker is not None:
            node_config += f" site-worker='{site_worker}'"
        args += ["--node-config", node_config]
        if self.node_auth:
            private, public = _node_key_pair(self.folder, f"node{partition}")
            self.flwr(["supernode", "register", str(public), "test"], timeout=120)
            args += ["--auth-supernode-private-key", str(private)]
        self.start(f"supernode{partition}", args)

    def start_site_worker(self, partition: int, socket_path: Path, app_config: Path) -> None:
        """Start `fedprompt flower site-worker` for a site, warmed with the app config; wait for it."""
        name = f"site-worker{partition}"
        process = self.start(
            name,
            ["fedprompt", "flower", "site-worker", "--socket", str(socket_path), "--config", str(app_config)],
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.tail(name)}")
            with contextlib.suppress(SiteWorkerError):
                SiteWorkerClient(socket_path, timeout=5).status()
                return
            time.sleep(0.5)
        raise TimeoutError(f"{name} not ready in 180 s: {self.tail(name)}")

    def flwr(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert done.returncode == 0, f"flwr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def run_app(
        self,
        app: Path,
        results: Path,
        round_timeout: float,
        supernodes: int | None = None,
        run_config: str = "",
    ) -> subprocess.Popen:
        """``flwr run`` the app; ``supernodes`` sets the simulation's federation size; ``run_config``
        adds run-config entries."""
        run_config = (
            f"results-dir='{results}' round-timeout={round_timeout} node-wait-timeout=240.0 {run_config}"
        ).strip()
        args = ["flwr", "run", str(app), "test", "--stream", "--run-config", run_config]
        if supernodes is not None:
            args += ["--federation-config", f"num-supernodes={supernodes}"]
        return self.start("flwr-run", args)

    def wait_for_results(self, run: subprocess.Popen, results: Path) -> Path:
        """The run folder, once the ServerApp has written its final prompt (or fail with the logs)."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            finals = list(results.glob(f"*/{FINAL_PROMPT_FILE}"))
            if finals:
                return finals[0].parent
            if run.poll() is not None and run.returncode != 0:
                break
            time.sleep(1.0)
        pytest.fail(f"no final prompt in {results}\n{self.all_tails()}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """End a started process and every process below it, each by its id."""
        process = self.processes.pop(name)
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(tree, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=15)
        process.wait(timeout=15)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def all_tails(self) -> str:
        names = sorted(p.stem for p in self.folder.glob("*.log"))
        return "\n".join(f"--- {name} ---\n{self.tail(name)}" for name in names)


@pytest.fixture
def make_cluster(tmp_path) -> Iterator:
    clusters: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        clusters.append(Cluster(tmp_path / "cluster", **kwargs))
        return clusters[-1]

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop_all()


def _assert_same_prompt(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(str(run_dir / FINAL_PROMPT_FILE))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), (
            f"{name} differs: max |diff| {(got[name] - tensor).abs().max()}"
        )


def test_tls_deployment_with_node_auth_gives_the_in_process_global_prompt(tmp_path, make_cluster):
    # Three sites, two sampled per round by fedprompt's seeded sampling, FedAdam on the server.
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2)
    config["federation"]["fraction"] = 0.6
    app = write_app(tmp_path / "app", config)
    expected = fedprompt.run(load_config(app / "fedprompt.yaml"), write=False)

    cluster = make_cluster(certs=Certificates.generate(tmp_path / "certs"), node_auth=True)
    cluster.start_superlink()
    for partition in range(3):
        cluster.start_supernode(partition)
    run = cluster.run_app(app, tmp_path / "results", round_timeout=240.0)
    run_dir = cluster.wait_for_results(run, tmp_path / "results")

    _assert_same_prompt(run_dir, expected.final_state)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("clients_accepted") for r in history] == [None, 2, 2]
    assert_same_history(history, expected.history)


class _HangingSiteWorker:
    """A site-worker socket that accepts connections and never answers: a SuperNode relaying to it
    is still in its first train message whenever the test looks, however loaded the machine."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.listener.accept()[0])
                self.connected.set()

    def close(self) -> None:
        for sock in [*self.held, self.listener]:
            sock.close()


def test_a_site_that_dies_mid_round_does_not_stop_the_run(tmp_path, make_cluster):
    # Insecure this time; three sites, min_clients 2, and site 2 is killed (SIGKILL) mid-round: its
    # ClientApp relays the first train message to a worker that never answers, and the test kills
    # the SuperNode once that relay is under way (no race with how fast the site would train).
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2)
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")

    # In process, the same job in which client 2 fails every round from the first on.
    experiment = build_experiment(cfg)

    def dead(*args, **kwargs):
        raise ConnectionError("the site went down")

    experiment.clients[2].fit_payload = dead
    expected = run_in_process(experiment, cfg)

    cluster = make_cluster()
    with tempfile.TemporaryDirectory(prefix="fpsw") as sockets:  # short: socket paths are limited
        hanging = _HangingSiteWorker(Path(sockets) / "site2.sock")
        try:
            cluster.start_superlink()
            for partition in range(2):
                cluster.start_supernode(partition)
            cluster.start_supernode(2, site_worker=Path(sockets) / "site2.sock")
            run = cluster.run_app(app, tmp_path / "results", round_timeout=240.0)
            if not hanging.connected.wait(timeout=RUN_TIMEOUT):
                pytest.fail(f"site 2 never relayed its train message\n{cluster.all_tails()}")
            cluster.stop("supernode2", signal.SIGKILL)  # the site dies while its ClientApp trains
            run_dir = cluster.wait_for_results(run, tmp_path / "results")
        finally:
            hanging.close()

    _assert_same_prompt(run_dir, expected.final_state)
    rows = [json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines()]
    assert {(r["round"], r["client_id"]) for r in rows if not r["accepted"]} == {(1, 2), (2, 2)}
    assert all(r["reason"] for r in rows if not r["accepted"])


def test_site_workers_keep_each_sites_backbone_for_the_whole_run(tmp_path, make_cluster):
    # Two sites, each with a long-lived site worker that its per-message ClientApp processes use.
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=2, rounds=2)
    app = write_app(tmp_path / "app", config)
    expected = fedprompt.run(load_config(app / "fedprompt.yaml"), write=False)

    cluster = make_cluster()
    with tempfile.TemporaryDirectory(prefix="fpsw") as sockets:  # short: socket paths are limited
        paths = [Path(sockets) / f"site{p}.sock" for p in range(2)]
        cluster.start_superlink()
        for partition, path in enumerate(paths):
            cluster.start_site_worker(partition, path, app / "fedprompt.yaml")
            cluster.start_supernode(partition, site_worker=path)
        run = cluster.run_app(app, tmp_path / "results", round_timeout=240.0)
        run_dir = cluster.wait_for_results(run, tmp_path / "results")

        _assert_same_prompt(run_dir, expected.final_state)
        for path in paths:
            status = SiteWorkerClient(path, timeout=30).status()
            # Built once at start (the ClientApp's config equals the app's), then two rounds of training.
            # (Count train requests, not connections: how many readiness polls a loaded machine
            # needed before the worker answered is no part of the test.)
            assert status["experiments_built"] == 1, status
            assert status["train"] == 2 and status["failed"] == 0, status


def test_flowers_simulation_engine_gives_the_in_process_global_prompt(tmp_path, make_cluster):
    # `flwr run` on Flower's simulation engine (Ray), against a SuperLink this test owns.
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (Ray)")
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2)
    config["federation"]["fraction"] = 0.6
    app = write_app(tmp_path / "app", config)
    expected = fedprompt.run(load_config(app / "fedprompt.yaml"), write=False)

    cluster = make_cluster()
    cluster.start_superlink(simulation=True)
    run = cluster.run_app(app, tmp_path / "results", round_timeout=240.0, supernodes=3)
    run_dir = cluster.wait_for_results(run, tmp_path / "results")

    _assert_same_prompt(run_dir, expected.final_state)


def test_secure_aggregation_on_real_supernodes_gives_the_plain_prompt(tmp_path, make_cluster):
    # Every stage message runs in a fresh flwr-clientapp process, so a client's secrets for the
    # round must ride in its node's Flower context from the key exchange to the unmasking (the site
    # workers only train: the ClientApp processes mask).
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=2, rounds=2)
    config["strategy"] = {"kind": "fedavg"}
    config["secure_aggregation"] = {"enabled": True}
    app = write_app(tmp_path / "app", config)
    plain = load_config(app / "fedprompt.yaml", ["secure_aggregation.enabled=false"])
    expected = fedprompt.run(plain, write=False)
    # Equal partitions: the secure run's uniform weights are the plain run's example weights.
    assert len({r["num_examples"] for r in expected.client_history if r["event"] == "fit"}) == 1

    # Secure aggregation needs SuperNode authentication: each partition bound to its registered key.
    cluster = make_cluster(certs=Certificates.generate(tmp_path / "certs"), node_auth=True)
    with tempfile.TemporaryDirectory(prefix="fpsw") as sockets:  # short: socket paths are limited
        cluster.start_superlink()
        for partition in range(2):
            path = Path(sockets) / f"site{partition}.sock"
            cluster.start_site_worker(partition, path, app / "fedprompt.yaml")
            cluster.start_supernode(partition, site_worker=path)
        keys = {str(p): (cluster.folder / f"node{p}.pub").read_text() for p in range(2)}
        (tmp_path / "node-keys.json").write_text(json.dumps(keys))
        node_keys = f"node-keys='{tmp_path / 'node-keys.json'}'"
        run = cluster.run_app(app, tmp_path / "results", round_timeout=240.0, run_config=node_keys)
        run_dir = cluster.wait_for_results(run, tmp_path / "results")

    got = load_file(str(run_dir / FINAL_PROMPT_FILE))
    for name, tensor in expected.final_state.items():
        assert float((got[name] - tensor).abs().max()) <= 1e-6, name  # the stated quantisation error
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("clients_accepted") for r in history] == [None, 2, 2]
