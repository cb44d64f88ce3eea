"""Drift-correcting strategies in whole runs: each learns on skewed tiny data, what they carry per
client is checkpointed and resumed bit for bit, SCAFFOLD's control variates are counted in the
bytes and survive Flower's runtimes (node context, site worker)."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flower_support import InMemoryGrid, client_app_nodes, write_app
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

import fedprompt
import fedprompt.flower.client_app as client_app_module
from fedprompt.config import load_config
from fedprompt.flower import run_server
from fedprompt.flower.app_config import AppSettings
from fedprompt.flower.client_app import build_client_app
from fedprompt.flower.site import ExperimentCache
from fedprompt.flower.site_worker import SiteWorker

from conftest import tiny_run_config, write_keyword_dataset

SIMILARITY = {"kind": "similarity", "template": "{text}", "description_template": "{label}"}
SKEWED = {"kind": "dirichlet", "alpha": 0.5, "min_partition_size": 10}
SGD = {"algorithm": "sgd", "lr": 0.1, "momentum": 0.9}


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _config(keyword_file: Path, strategy: dict, optimizer: dict | None = None, rounds: int = 3) -> dict:
    return tiny_run_config(
        keyword_file,
        head=SIMILARITY,
        partition=SKEWED,
        strategy=strategy,
        optimizer=optimizer or {},
        federation={"rounds": rounds},
    )


@pytest.mark.parametrize(
    ("strategy", "optimizer"),
    [
        ({"kind": "scaffold"}, SGD),
        ({"kind": "feddyn", "alpha": 0.01}, {}),
        ({"kind": "fedavgm", "server_lr": 1.0, "momentum": 0.5}, {}),
        ({"kind": "fedavg", "server_lr": 1.5}, {}),
        ({"kind": "fednova"}, {}),
    ],
    ids=["scaffold", "feddyn", "fedavgm", "fedavg-server-lr", "fednova"],
)
def test_each_strategy_learns_on_skewed_data(keyword_file, strategy, optimizer):
    result = fedprompt.run(_config(keyword_file, strategy, optimizer), write=False)
    accuracy = result.metric("global_accuracy")
    assert accuracy[-1] >= 0.5, accuracy  # chance is 1/3
    assert accuracy[-1] >= accuracy[0] + 0.15, accuracy
    assert result.history[-1]["clients_accepted"] == 4


@pytest.mark.parametrize(
    ("strategy", "optimizer", "carried", "server"),
    [
        (
            {"kind": "scaffold"},
            {**SGD, "schedule": {"kind": "cosine", "rounds": 3, "warmup_rounds": 1, "warmup_lr": 0.01}},
            "control",
            "c",
        ),
        ({"kind": "feddyn", "alpha": 0.01}, {}, "dynamic", "h"),
    ],
    ids=["scaffold-cosine", "feddyn"],
)
@pytest.mark.slow
def test_carried_state_is_checkpointed_and_resumed_bit_exactly(
    keyword_file, tmp_path, strategy, optimizer, carried, server
):
    straight = fedprompt.run(_config(keyword_file, strategy, optimizer), output_dir=tmp_path / "a")
    partial = fedprompt.run(_config(keyword_file, strategy, optimizer, rounds=1), output_dir=tmp_path / "b")
    resumed = fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=3"])
    assert torch.equal(resumed.final_state["prompt.embeddings"], straight.final_state["prompt.embeddings"])
    a = load_file(straight.run_dir / "checkpoint.safetensors")
    b = load_file(resumed.run_dir / "checkpoint.safetensors")
    assert sorted(a) == sorted(b)
    per_client = sorted(k for k in a if k.startswith("client/"))
    assert per_client == [f"client/{c}/{carried}/prompt.embeddings" for c in range(4)]
    for key in [*per_client, f"strategy/{server}/prompt.embeddings"]:
        assert a[key].shape == (8, 32) and torch.equal(a[key], b[key]), key
        assert a[key].abs().sum() > 0, key
    assert not torch.equal(a[per_client[0]], a[per_client[1]])  # each client's own
    # every client every round: SCAFFOLD's c is the example-weighted mean of the c_i, FedDyn's h the plain
    # mean of the g_k
    fits = [r for r in straight.client_history if r["event"] == "fit" and r["round"] == 3]
    counts = {r["client_id"]: r["num_examples"] if server == "c" else 1 for r in fits}
    mean = sum(counts[c] * a[key].double() for c, key in enumerate(per_client)) / sum(counts.values())
    assert torch.allclose(a[f"strategy/{server}/prompt.embeddings"].double(), mean, rtol=0, atol=1e-6)


def test_scaffold_sends_control_variates_both_ways_and_counts_them(keyword_file):
    plain = fedprompt.run(_config(keyword_file, {"kind": "fedavg"}, SGD, rounds=1), write=False)
    scaffold = fedprompt.run(_config(keyword_file, {"kind": "scaffold"}, SGD, rounds=1), write=False)
    prompt_bytes = 8 * 32 * 4
    for direction in ("up", "down"):
        key = f"bytes_{direction}_per_client_round"
        assert plain.summary[key] >= prompt_bytes
        assert scaffold.summary[key] >= plain.summary[key] + prompt_bytes


# --------------------------------------------------------------------------- Flower


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp process has set before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def site_worker() -> Iterator[Path]:
    # Unix socket paths are limited to about 100 bytes: a short folder, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="fpsw") as folder:
        path = Path(folder) / "site.sock"
        site = SiteWorker(path)
        thread = threading.Thread(target=site.serve_forever, daemon=True)
        thread.start()
        try:
            yield path
        finally:
            site.shutdown()
            thread.join(timeout=10)


class _FreshEachMessage(ExperimentCache):
    """The deployment engine without a site worker: every message builds the experiment anew."""

    def get(self, config):
        from fedprompt.flower.site import HostedExperiment

        return HostedExperiment.build(config)


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_scaffold_on_flower_keeps_control_variates_in_the_site_worker_and_the_node_context(
    keyword_file, tmp_path, site_worker, monkeypatch
):
    config = {**_config(keyword_file, {"kind": "scaffold"}, SGD, rounds=2), "name": "scaffold-flower"}
    config["partition"] = {**config["partition"], "num_clients": 3}
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)
    client_app = build_client_app(app / "fedprompt.yaml")

    relayed = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(3), {}, {"site-worker": str(site_worker)})),
        cfg,
        AppSettings(results_dir=tmp_path / "relayed"),
    )
    monkeypatch.setattr(client_app_module.InProcessSite, "_cache", _FreshEachMessage())
    fresh = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(3), {})),
        cfg,
        AppSettings(results_dir=tmp_path / "fresh"),
    )
    for result in (relayed, fresh):
        assert torch.equal(result.final_state["prompt.embeddings"], expected.final_state["prompt.embeddings"])
        checkpoint = load_file(result.run_dir / "checkpoint.safetensors")
        assert checkpoint["strategy/c/prompt.embeddings"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_fedpeptao_clients_keep_their_moments_on_flower(keyword_file, tmp_path, site_worker, monkeypatch):
    """FedPepTAO's clients carry their AdamW moments from round 1 into round 2 through the site
    worker and through Flower's node context alike: both runs end where the in-process run does (a
    client that lost its moments would take other steps in round 2)."""
    config = {**_config(keyword_file, {"kind": "fedpeptao"}, {"lr": 0.05}, rounds=2), "name": "peptao-flower"}
    config["partition"] = {**config["partition"], "num_clients": 3}
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    assert cfg.optimizer.keep_state
    expected = fedprompt.run(cfg, write=False)
    forgetful = fedprompt.run(
        cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"keep_state": False})}),
        write=False,
    )
    assert not torch.equal(
        forgetful.final_state["prompt.embeddings"], expected.final_state["prompt.embeddings"]
    )
    client_app = build_client_app(app / "fedprompt.yaml")
    relayed = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(3), {}, {"site-worker": str(site_worker)})),
        cfg,
        AppSettings(results_dir=tmp_path / "relayed"),
    )
    monkeypatch.setattr(client_app_module.InProcessSite, "_cache", _FreshEachMessage())
    fresh = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(3), {})),
        cfg,
        AppSettings(results_dir=tmp_path / "fresh"),
    )
    for result in (relayed, fresh):
        assert torch.equal(result.final_state["prompt.embeddings"], expected.final_state["prompt.embeddings"])
