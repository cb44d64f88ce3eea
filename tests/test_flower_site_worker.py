"""The site worker: a long-lived per-site process that keeps the experiment for Flower's
per-message ClientApp processes. Served here from a thread of the test process."""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flower_support import (
    InMemoryGrid,
    assert_same_history,
    client_app_nodes,
    tiny_config,
    write_app,
    write_dataset,
)
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedprompt
import fedprompt.flower.client_app as client_app_module
from fedprompt.config import ConfigError, load_config
from fedprompt.federation.instructions import FitInstructions
from fedprompt.flower import run_server
from fedprompt.flower.app_config import AppSettings
from fedprompt.flower.client_app import build_client_app
from fedprompt.flower.records import INSTRUCTIONS_RECORD, instructions_record, payload_content
from fedprompt.flower.site import ExperimentCache
from fedprompt.flower.site_worker import Frame, SiteWorker, SiteWorkerClient, SiteWorkerError


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has set before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Unix socket paths are limited to about 100 bytes: a short folder, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="fpsw") as folder:
        yield Path(folder) / "site.sock"


@pytest.fixture
def worker(socket_path, request) -> Iterator[SiteWorker]:
    site = SiteWorker(socket_path, read_timeout=getattr(request, "param", 60.0))
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.shutdown()
        thread.join(timeout=10)


def _raw_request(path: Path, header: dict, body: bytes = b"") -> Frame:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        Frame(header, body).send(sock)
        return Frame.receive(sock, 1 << 20)


def test_a_run_through_the_site_worker_gives_the_in_process_prompt_and_builds_once(
    tmp_path, socket_path, worker, monkeypatch
):
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2)
    config["federation"]["local_evaluation"] = True
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)

    process_cache = ExperimentCache()
    monkeypatch.setattr(client_app_module.InProcessSite, "_cache", process_cache)
    client_app = build_client_app(app / "fedprompt.yaml")
    nodes = client_app_nodes(client_app, range(3), {}, {"site-worker": str(socket_path)})
    grid = InMemoryGrid(nodes)
    result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs"))

    assert torch.equal(result.final_state["prompt.embeddings"], expected.final_state["prompt.embeddings"])
    assert_same_history(result.history, expected.history)
    kinds = [m.metadata.message_type for m in grid.sent]
    status = SiteWorkerClient(socket_path, timeout=30).status()
    assert status["experiments_built"] == 1  # one backbone for every round and every message
    assert status["train"] == kinds.count("train") and status["evaluate"] == kinds.count("evaluate")
    assert status["failed"] == 0
    assert process_cache.builds == 0  # the ClientApp only relayed


def test_the_socket_is_private_and_a_second_worker_on_it_is_refused(socket_path, worker):
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="already serves"):
        SiteWorker(socket_path)


def test_a_socket_left_by_a_killed_worker_is_replaced_and_a_plain_file_is_not(socket_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(socket_path))  # bound, never listening: what a SIGKILLed worker leaves
    site = SiteWorker(socket_path)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        assert SiteWorkerClient(socket_path, timeout=30).status()["requests"] == 1
    finally:
        site.shutdown()
        thread.join(timeout=10)
    assert not socket_path.exists()  # removed on shutdown
    socket_path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="is not a socket"):
        SiteWorker(socket_path)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        SiteWorker(socket_path.parent / "missing" / "site.sock")


def test_bad_requests_get_error_replies_and_the_worker_goes_on(tmp_path, socket_path, worker):
    cfg = load_config(tiny_config(write_dataset(tmp_path / "data.jsonl")))
    config_json = cfg.model_dump_json()
    record = dict(instructions_record(1, FitInstructions(1, 5)))

    reply = _raw_request(socket_path, {"op": "delete-everything"})
    assert not reply.header["ok"] and "unknown op 'delete-everything'" in reply.header["error"]
    reply = _raw_request(socket_path, {"op": "train", "config": '{"partition": {"alpah": 1}}'})
    assert not reply.header["ok"] and "alpah" in reply.header["error"]
    reply = _raw_request(socket_path, {"op": "train", "config": config_json, "instructions": record})
    assert not reply.header["ok"] and "safetensors" in reply.header["error"].lower()
    evaluate = {"op": "evaluate", "config": config_json, "partition": 7, "accepted_round": 0}
    reply = _raw_request(socket_path, evaluate, b"x")
    assert not reply.header["ok"] and "partition 7 is outside 0..2" in reply.header["error"]
    bad = {**record, "round": -1}
    reply = _raw_request(socket_path, {"op": "train", "config": config_json, "instructions": bad})
    assert not reply.header["ok"] and "'round' must be a non-negative integer" in reply.header["error"]

    client = SiteWorkerClient(socket_path, timeout=30)
    too_big = load_config(tiny_config(write_dataset(tmp_path / "data.jsonl")), ["payload.max_bytes=2048"])
    with pytest.raises(SiteWorkerError, match="frame body is 4096 bytes, over the limit of 2048"):
        client.fit(too_big, 1, FitInstructions(1, 5), b"\0" * 4096)
    with pytest.raises(SiteWorkerError, match="payload is not valid safetensors"):
        client.evaluate(cfg, 1, 0, b"\0" * 16)
    status = client.status()
    # Rejected before any model loads: the op, the config, the body's size; the rest after one build.
    assert status["failed"] == 7 and status["requests"] == 8 and status["experiments_built"] == 1


def test_a_peer_that_sends_nothing_does_not_block_the_site(socket_path, worker):
    # A peer connects and sends two bytes of a header, then nothing: with the worker's 60 s read
    # timeout it is still stalled while another client's requests come and go.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect(str(socket_path))
        stalled.sendall(b"\0\0")
        client = SiteWorkerClient(socket_path, timeout=60)
        assert client.status()["status"] == 1
        assert client.status()["status"] == 2
    status = client.status()
    assert status["failed"] == 0 and status["timed_out"] == 0  # the stalled peer was never timed out


@pytest.mark.parametrize("worker", [0.5], indirect=True)
def test_a_peer_that_trickles_bytes_is_cut_off_with_an_error_and_the_site_goes_on(socket_path, worker):
    # The read timeout bounds the whole request, not each read: a peer that sends a byte of an
    # endless header every few milliseconds gets an error reply once its time is up.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(socket_path))
        slow.sendall((1000).to_bytes(4, "big"))
        slow.settimeout(0.01)
        reply = b""
        for _ in range(100_000):  # at least 1000 s of trickling: the worker gives up long before
            try:
                slow.sendall(b" ")
                reply += slow.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # the worker answered and closed
                break
            if len(reply) >= 4:
                break
        slow.settimeout(60)
        with contextlib.suppress(OSError):
            while True:
                chunk = slow.recv(4096)
                if not chunk:
                    break
                reply += chunk
    size = int.from_bytes(reply[:4], "big")
    header = json.loads(reply[4 : 4 + size])
    assert not header["ok"] and "RequestTimeout" in header["error"] and "read timeout" in header["error"]
    status = SiteWorkerClient(socket_path, timeout=60).status()
    assert status["timed_out"] == 1 and status["failed"] == 1 and status["status"] == 1


def test_an_unreachable_worker_and_a_bad_node_config_name_the_fix(tmp_path, socket_path):
    app = write_app(tmp_path / "app", tiny_config(write_dataset(tmp_path / "data.jsonl")))
    client_app = build_client_app(app / "fedprompt.yaml")
    train = Message(
        payload_content(b"\0" * 16, {INSTRUCTIONS_RECORD: instructions_record(0, FitInstructions(1, 5))}),
        dst_node_id=5,
        message_type="train",
    )
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "site-worker": str(socket_path)},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(SiteWorkerError, match=f"fedprompt flower site-worker --socket {socket_path}"):
        client_app(train, context)
    context.node_config = {"partition-id": 0, "site-worker": 3}
    with pytest.raises(ConfigError, match=r"site-worker.*quoted string"):
        client_app(train, context)


def test_the_apps_client_module_imports_no_torch(tmp_path):
    # Flower imports the ClientApp's module in every per-message process: with a site worker that
    # process only relays bytes, so importing it must not pull in torch (about 1.5 s a message).
    app = write_app(tmp_path / "app", tiny_config(write_dataset(tmp_path / "data.jsonl")))
    probe = "import sys, fedprompt_app.client; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=app, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


class _FreshEachMessage(ExperimentCache):
    """The deployment engine without a site worker: every message builds the experiment anew."""

    def get(self, config):
        from fedprompt.flower.site import HostedExperiment

        self.builds += 1
        return HostedExperiment.build(config)


def test_client_state_across_rounds_survives_in_the_site_worker(
    tmp_path, socket_path, worker, monkeypatch, tiny_clip
):
    # ATPFL contrasts with the client's own prompt of its previous round, carried client state: the
    # site worker keeps it as the in-process run does, and so does a fresh process per message
    # (the state rides in the node's Flower context); a node that loses its context each message
    # starts afresh every round (the update says so) and the global prompt comes out different.
    from clip_support import clip_run_config

    prompt = {
        "kind": "twin",
        "text": {"num_tokens": 4},
        "visual": {"kind": "pixel", "size": 8},
        "contrastive": True,
    }
    data = {"source": "image-folder", "name": str(tiny_clip.generated)}
    config = clip_run_config(tiny_clip, prompt, data, federation={"rounds": 3, "min_clients": 2})
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)
    client_app = build_client_app(app / "fedprompt.yaml")

    relayed = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(3), {}, {"site-worker": str(socket_path)})),
        cfg,
        AppSettings(results_dir=tmp_path / "relayed"),
    )
    monkeypatch.setattr(client_app_module.InProcessSite, "_cache", _FreshEachMessage())
    fresh = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(3), {})),
        cfg,
        AppSettings(results_dir=tmp_path / "fresh"),
    )
    forgetful_nodes = client_app_nodes(client_app, range(3), {})
    forgetful = run_server(
        InMemoryGrid({node: _forgetting(handler) for node, handler in forgetful_nodes.items()}),
        cfg,
        AppSettings(results_dir=tmp_path / "forgetful"),
    )

    for name, tensor in expected.final_state.items():
        assert torch.equal(relayed.final_state[name], tensor), name
        assert torch.equal(fresh.final_state[name], tensor), name
    assert any(not torch.equal(forgetful.final_state[n], t) for n, t in expected.final_state.items())
    resets = [r for r in forgetful.client_history if r.get("client_state_reset") == 1.0]
    assert {r["round"] for r in resets} == {2, 3}  # from the second round on, every client noticed


def _forgetting(handler):
    """A node handler whose Flower context loses its state before every message."""

    def handle(message, node):
        context = handler.__defaults__[0]
        context.state = RecordDict()
        return handler(message, node)

    return handle
