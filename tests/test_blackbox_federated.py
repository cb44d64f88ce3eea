"""Black-box federated runs: CMA-ES and SPSA clients, FedBPT, a served backbone, SST-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedprompt
from fedprompt.config import load_config
from fedprompt.serving import InferenceService, create_app, serve_in_thread
from fedprompt.tasks.text.parts import load_backbone

from conftest import shared_dataset, tiny_run_config, write_keyword_dataset

TOKEN = "simulation-token-0123456789"


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _config(data: Path, optimizer: dict, strategy: dict, **sections) -> dict:
    config = tiny_run_config(data, **sections)
    config["prompt"] = {"kind": "intrinsic", "dim": 50, "num_tokens": 4}
    config["optimizer"] = optimizer
    config["strategy"] = strategy
    return config


CMAES = {"kind": "cmaes", "popsize": 8, "budget": 8 * 16 * 5, "batch_size": 16}


@pytest.mark.parametrize(
    ("optimizer", "strategy"),
    [
        (CMAES, {"kind": "fedbpt"}),
        (CMAES, {"kind": "fedbpt", "rule": "mean"}),
        (
            {"kind": "spsa", "lr": 2.0, "epsilon": 0.5, "budget": 2 * 16 * 20, "batch_size": 16},
            {"kind": "fedavg"},
        ),
    ],
    ids=["fedbpt-cma", "fedbpt-mean", "spsa-fedavg"],
)
def test_black_box_federated_training_learns_and_sends_d_floats(keywords, optimizer, strategy):
    config = _config(keywords, optimizer, strategy)
    result = fedprompt.run(config, write=False)
    accuracy = result.metric("global_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.05, accuracy
    assert set(result.final_state) == {"prompt.z"} and result.final_state["prompt.z"].shape == (50,)
    rows = [row for row in result.client_history if row.get("accepted")]
    assert rows and all(row["bytes_down"] < 50 * 4 + 400 for row in rows)  # z, σ and a safetensors header
    per_round = optimizer["budget"] // (optimizer.get("popsize", 2) * 16) * optimizer.get("popsize", 2) * 16
    for row in rows:
        extra = row["num_examples"] if strategy["kind"] == "fedbpt" else 0  # FedBPT scores its final mean
        assert row["queries"] == per_round + extra


def test_fedbpt_resumes_from_its_checkpoint_exactly(keywords, tmp_path):
    config = _config(keywords, CMAES, {"kind": "fedbpt"}, federation={"rounds": 2, "min_clients": 2})
    straight = fedprompt.run(config, write=False)
    first = fedprompt.run({**config, "federation": {"rounds": 1, "min_clients": 2}}, output_dir=tmp_path)
    resumed = fedprompt.run(resume=first.run_dir, overrides=["federation.rounds=2"])
    assert torch.equal(straight.final_state["prompt.z"], resumed.final_state["prompt.z"])


def test_the_service_on_loopback_serves_several_clients_in_one_run(keywords, monkeypatch):
    local_config = _config(
        keywords,
        CMAES,
        {"kind": "fedbpt"},
        federation={"rounds": 2, "min_clients": 2, "local_evaluation": False},
    )
    cfg = load_config(local_config)
    service = InferenceService(load_backbone(cfg.backbone, cfg.head.kind, cfg.seed), "tiny")
    monkeypatch.setenv("FEDPROMPT_API_TOKEN", TOKEN)
    with serve_in_thread(create_app(service, {"simulation": TOKEN})) as url:
        remote = fedprompt.run({**local_config, "backbone": {"kind": "remote", "url": url}}, write=False)
    local = fedprompt.run(local_config, write=False)
    assert torch.equal(remote.final_state["prompt.z"], local.final_state["prompt.z"])
    assert remote.metric("global_accuracy") == local.metric("global_accuracy")
    trained = [row for row in remote.client_history if row.get("accepted")]
    assert len({row["client_id"] for row in trained}) == 4 and len(trained) == 8
    evaluation = 3 * round(600 * 0.25)  # the server's test set, scored at rounds 0, 1 and 2
    assert service.usage("simulation").queries == sum(row["queries"] for row in trained) + evaluation


def test_a_remote_run_without_its_token_fails_naming_the_variable(keywords, monkeypatch):
    monkeypatch.delenv("FEDPROMPT_NO_SUCH_TOKEN", raising=False)
    config = _config(keywords, CMAES, {"kind": "fedbpt"})
    config["backbone"] = {
        "kind": "remote",
        "url": "http://127.0.0.1:9",
        "token_env": "FEDPROMPT_NO_SUCH_TOKEN",
    }
    with pytest.raises(fedprompt.ConfigError, match="FEDPROMPT_NO_SUCH_TOKEN is empty or unset"):
        fedprompt.run(config, write=False)


def _sst2_jsonl(folder: Path, name: str, out: Path) -> Path:
    labels = ("negative", "positive")
    with out.open("w") as handle:
        for line in (folder / name).read_text().splitlines():
            label, _, text = line.partition(" ")
            handle.write(json.dumps({"text": text, "label": labels[int(label)]}) + "\n")
    return out


@pytest.mark.slow
def test_black_box_fedbpt_on_minilm_sst2_rises_well_above_chance(tmp_path):
    sst2 = shared_dataset("sst2")
    config = {
        "name": "fedbpt-sst2-test",
        "backbone": {"kind": "hf-text", "model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": {
            "kind": "similarity",
            "label_descriptions": {"negative": "A bad movie.", "positive": "A good movie."},
        },
        "prompt": {"kind": "intrinsic", "dim": 500, "num_tokens": 5},
        "data": {
            "source": "files",
            "files": {
                "train": str(_sst2_jsonl(sst2, "stsa.binary.train", tmp_path / "train.jsonl")),
                "test": str(_sst2_jsonl(sst2, "stsa.binary.dev", tmp_path / "dev.jsonl")),
            },
            "max_per_class": 40,
            "max_test_examples": 150,
        },
        "partition": {"kind": "iid", "num_clients": 2, "local_val_fraction": 0},
        "federation": {"rounds": 2, "min_clients": 2, "local_evaluation": False, "evaluate_every": 2},
        "optimizer": {"kind": "cmaes", "popsize": 8, "budget": 8 * 16 * 4, "batch_size": 16, "chunk_size": 1},
        "strategy": {"kind": "fedbpt"},
        "runtime": {"progress": False},
    }
    result = fedprompt.run(config, write=False)
    accuracy = result.metric("global_accuracy")
    assert accuracy[-1] >= 0.65 and accuracy[-1] > accuracy[0] + 0.05, accuracy
    assert result.summary["bytes_down_per_client_round"] < 4096
