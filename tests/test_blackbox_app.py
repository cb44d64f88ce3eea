"""The black-box API app as its parties run it: the model owner's inference service (`fedprompt
serve`, HTTPS, tokens, quotas), the federation server and two data owners' clients, each a process
of its own on loopback (`python -m apps.blackbox_api server|client`), in BBT's reference prompt
shape (50 tokens, d = 500) on the bundled MiniLM.

Every wait polls for readiness with a deadline (no count of polls, no timed assertion); each
process gets its own session and is ended, with what it started, by process id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tls_support import Certificates
from typer.testing import CliRunner

import fedprompt
from apps.blackbox_api.__main__ import app as blackbox_cli
from apps.blackbox_api.report import SERVER_TOKEN, site_token
from fedprompt.execution.results import CLIENTS_FILE, FINAL_PROMPT_FILE

from conftest import KEYWORDS, write_keyword_dataset

SERVER_TIMEOUT = 900.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Parties:
    """The processes of one test, each in its own session with its log; stopped by process id."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("w") as log:
            self.started[name] = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
                env=env,
                start_new_session=True,
            )
        return self.started[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.started)

    def stop(self, name: str) -> None:
        process = self.started[name]
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            process.send_signal(signal.SIGTERM)  # a role stops its own children first
            _, alive = psutil.wait_procs(tree, timeout=60)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


@pytest.fixture
def parties(tmp_path):
    started = Parties(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def _config(tmp_path: Path, service_url: str, ca: Path) -> Path:
    train = write_keyword_dataset(tmp_path / "train.jsonl", n=48, seed=1)
    test = write_keyword_dataset(tmp_path / "test.jsonl", n=24, seed=2)
    config = {
        "name": "blackbox-app",
        "seed": 1,
        "backbone": {
            "kind": "remote",
            "url": service_url,
            "ca_file": str(ca),
            "tokenizer": "bundled:all-MiniLM-L6-v2",
            "timeout": 300,
            "retries": 5,
        },
        "head": {
            "kind": "similarity",
            "label_descriptions": {
                label: f"About {' and '.join(words)}." for label, words in KEYWORDS.items()
            },
        },
        "prompt": {"kind": "intrinsic", "dim": 500, "num_tokens": 50},
        "data": {"source": "files", "files": {"train": str(train), "test": str(test)}},
        "partition": {"kind": "iid", "num_clients": 2, "local_val_fraction": 0.0},
        "federation": {"rounds": 2, "min_clients": 2, "local_evaluation": False},
        "optimizer": {"kind": "cmaes", "popsize": 6, "budget": 96, "batch_size": 8},
        "strategy": {"kind": "fedbpt"},
        "runtime": {"device": "cpu", "progress": False},
    }
    path = tmp_path / "blackbox-app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait(condition, timeout: float, what: str, process: subprocess.Popen, parties: Parties) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen\n{parties.logs()}")
        time.sleep(0.5)


@pytest.mark.slow
def test_service_server_and_clients_run_as_separate_processes(tmp_path, parties):
    certs = Certificates.generate(tmp_path / "certs")
    tokens = {name: secrets.token_hex(16) for name in (SERVER_TOKEN, site_token(0), site_token(1), "audit")}
    service_port, link_port = _free_port(), _free_port()
    url = f"https://127.0.0.1:{service_port}"
    config = _config(tmp_path, url, certs.ca)
    usage_file = tmp_path / "usage.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    fedprompt_cli = [sys.executable, "-c", "from fedprompt.cli import main; main()"]
    app = [sys.executable, "-m", "apps.blackbox_api"]

    # The model owner: HTTPS, one token per party, a query quota, a rate limit, the usage file.
    service = parties.start(
        "service",
        [
            *fedprompt_cli,
            "serve",
            "--model",
            "bundled:all-MiniLM-L6-v2",
            "--max-length",
            "32",
            "--port",
            str(service_port),
            "--ssl-certfile",
            str(certs.cert),
            "--ssl-keyfile",
            str(certs.key),
            "--max-projection-floats",
            str(50 * 384 * 500),  # BBT's reference prompt on MiniLM, exactly
            "--query-quota",
            "100000",
            "--rate-limit",
            "100",
            "--usage-file",
            str(usage_file),
        ],
        {**env, "FEDPROMPT_API_TOKENS": ",".join(f"{n}:{t}" for n, t in tokens.items())},
    )
    context = ssl.create_default_context(cafile=str(certs.ca))

    def service_ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/v1/health", verify=context, timeout=5).status_code == 200
        return False

    _wait(service_ready, 300, "the service answering over HTTPS", service, parties)

    # The federation server, then the two data owners, each with its own token.
    server = parties.start(
        "server",
        [
            *app,
            "server",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--insecure",
            "--results",
            str(tmp_path / "runs"),
            "--workdir",
            str(tmp_path / "server-work"),
            "--round-timeout",
            "600",
            "--node-wait-timeout",
            "600",
            "--usage",
            str(usage_file),
        ],
        {**env, "FEDPROMPT_API_TOKEN": tokens[SERVER_TOKEN]},
    )
    for partition in (0, 1):
        parties.start(
            f"client{partition}",
            [
                *app,
                "client",
                "--config",
                str(config),
                "--partition-id",
                str(partition),
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--insecure",
                "--workdir",
                str(tmp_path / "client-work"),
            ],
            {**env, "FEDPROMPT_API_TOKEN": tokens[site_token(partition)]},
        )
    try:
        server.wait(timeout=SERVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not finish in {SERVER_TIMEOUT:.0f} s\n{parties.logs()}")
    assert server.returncode == 0, parties.logs()

    (run_dir,) = [p.parent for p in (tmp_path / "runs").glob(f"*/{FINAL_PROMPT_FILE}")]
    report = json.loads((run_dir / "cost_report.json").read_text())
    rows = [json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines()]
    usage = json.loads(usage_file.read_text())

    # Every query is counted once, and the client's own count equals the service's for its token:
    # per round 2 generations of 6 candidates × 8 examples, then FedBPT's final loss on each example.
    assert [c["rounds_accepted"] for c in report["clients"]] == [2, 2]
    for client in report["clients"]:
        examples = {r["num_examples"] for r in rows if r["client_id"] == client["client_id"]}
        (n,) = examples
        expected = 2 * (2 * 6 * 8 + n)
        assert client["queries_reported"] == client["service"]["queries"] == expected
        assert usage[site_token(client["client_id"])]["queries"] == expected
        assert client["federation_bytes_down_per_round"] > 2000  # z (500 floats) and σ
        assert client["service"]["bytes_received_per_round"] > 50 * client["federation_bytes_up_per_round"]
    assert report["server"]["queries"] == 3 * 24  # the global evaluation at rounds 0, 1 and 2
    assert report["final_accuracy"] > 1 / 3  # above chance (3 classes)
    printed = parties.log("server")
    assert "query budget per client per round: 96" in printed and "queries (service)" in printed

    # The same configuration in one process, against the same service with another token, gives
    # the same global prompt bit for bit: the parties computed what a single process would.
    os.environ["FEDPROMPT_APP_AUDIT_TOKEN"] = tokens["audit"]
    try:
        reference = fedprompt.run(config, ["backbone.token_env=FEDPROMPT_APP_AUDIT_TOKEN"], write=False)
    finally:
        del os.environ["FEDPROMPT_APP_AUDIT_TOKEN"]
    final = load_file(str(run_dir / FINAL_PROMPT_FILE))
    assert torch.equal(final["prompt.z"], reference.final_state["prompt.z"])


CLIENT = ["client", "--config", "configs/blackbox-api.yaml", "--superlink", "h:1"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["server", "--config", "configs/fedbpt-sst2.yaml", "--insecure"], {}, "backbone.kind is 'hf-text'"),
        (["server", "--config", "configs/blackbox-api.yaml"], {"FEDPROMPT_API_TOKEN": "t"}, "or --insecure"),
        (
            [*CLIENT, "--partition-id", "0"],
            {"FEDPROMPT_API_TOKEN": "t"},
            "--root-certificates (TLS) or --insecure",
        ),
        ([*CLIENT, "--partition-id", "3", "--insecure"], {"FEDPROMPT_API_TOKEN": "t"}, "outside 0..2"),
        (
            [*CLIENT, "--partition-id", "0", "--insecure"],
            {"FEDPROMPT_API_TOKEN": ""},
            "the environment variable FEDPROMPT_API_TOKEN is empty or unset",
        ),
    ],
)
def test_role_mistakes_are_one_error_line_before_anything_starts(args, env, message, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(blackbox_cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
