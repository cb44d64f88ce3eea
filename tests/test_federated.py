"""Federated runs end to end: learning, reproducibility, resume, results folder, bytes, bad clients, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fedprompt
from fedprompt.cli import app
from fedprompt.config import load_config
from fedprompt.federation.state import Update
from fedprompt.training.client import FitResult

from conftest import TINY_LLAMA, shared_dataset, tiny_run_config, write_keyword_dataset


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


SIMILARITY = {"kind": "similarity", "template": "{text}", "description_template": "{label}"}


@pytest.mark.parametrize(
    ("variant", "at_least"),
    [
        ({}, 0.7),
        ({"prompt": {"kind": "deep"}}, 0.7),
        ({"head": SIMILARITY}, 0.85),
        (
            {
                "backbone": {"random_config": {**TINY_LLAMA, "initializer_range": 0.3}},
                "head": {"template": "{text} is"},
            },
            0.85,
        ),
        (
            {"partition": {"kind": "dirichlet", "alpha": 0.5, "min_partition_size": 10}, "head": SIMILARITY},
            0.6,
        ),
    ],
    ids=["soft-mlm", "deep-mlm", "similarity", "decoder", "dirichlet-similarity"],
)
def test_tiny_random_federated_run_learns(keyword_file, variant, at_least):
    result = fedprompt.run(tiny_run_config(keyword_file, **variant), write=False)
    acc = result.metric("global_accuracy")
    assert len(acc) == 5  # round 0 (the initial prompt) and four rounds
    assert acc[-1] >= at_least, acc  # chance is 1/3
    assert acc[-1] >= acc[0] + 0.25, acc
    assert result.history[-1]["clients_accepted"] == 4


def test_same_seed_gives_a_bit_identical_global_prompt(keyword_file):
    cfg = tiny_run_config(
        keyword_file,
        partition={"kind": "dirichlet", "alpha": 0.5, "min_partition_size": 10},
        federation={"rounds": 2, "fraction": 0.5, "min_clients": 2},
    )
    first = fedprompt.run(cfg, write=False)
    second = fedprompt.run(cfg, write=False)
    other = fedprompt.run({**cfg, "seed": 1}, write=False)
    assert first.final_state.keys() == second.final_state.keys()
    for name in first.final_state:
        assert torch.equal(first.final_state[name], second.final_state[name])
        assert not torch.equal(first.final_state[name], other.final_state[name])
    assert [r["global_accuracy"] for r in first.history] == [r["global_accuracy"] for r in second.history]
    sampled = [r["client_id"] for r in first.client_history if r["event"] == "fit"]
    assert sampled == [r["client_id"] for r in second.client_history if r["event"] == "fit"]
    assert len(sampled) == 4


def test_results_folder_and_resume_from_a_checkpoint(keyword_file, tmp_path):
    cfg = tiny_run_config(keyword_file, federation={"rounds": 3})
    straight = fedprompt.run(cfg, output_dir=tmp_path / "a")

    folder = straight.run_dir
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows[1:])
    clients = [json.loads(line) for line in (folder / "clients.jsonl").read_text().splitlines()]
    fits = [c for c in clients if c["event"] == "fit"]
    assert len(fits) == 12 and all(c["accepted"] for c in fits)
    evaluations = [c for c in clients if c["event"] == "evaluate"]
    assert len(evaluations) == 16 and {c["round"] for c in evaluations} == {0, 1, 2, 3}  # 4 clients a round
    final = load_file(folder / "final_prompt.safetensors")
    assert torch.equal(final["prompt.embeddings"], straight.final_state["prompt.embeddings"])
    assert load_config(folder / "config.yaml") == straight.config
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final_accuracy"] == rows[-1]["global_accuracy"]

    # Stop after round 1, then resume the same folder for the remaining rounds.
    partial = fedprompt.run(
        tiny_run_config(keyword_file, federation={"rounds": 1}), output_dir=tmp_path / "b"
    )
    resumed = fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=3"])
    assert resumed.run_dir == partial.run_dir
    assert torch.equal(resumed.final_state["prompt.embeddings"], straight.final_state["prompt.embeddings"])
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]


def test_half_precision_wire_halves_the_bytes_and_still_learns(keyword_file):
    fp32 = fedprompt.run(tiny_run_config(keyword_file, federation={"rounds": 2}), write=False)
    fp16 = fedprompt.run(
        tiny_run_config(keyword_file, federation={"rounds": 2}, payload={"wire_dtype": "float16"}),
        write=False,
    )
    prompt_numbers = fp32.final_state["prompt.embeddings"].numel()
    up32, up16 = fp32.history[1]["bytes_up_per_client"], fp16.history[1]["bytes_up_per_client"]
    assert up32 - up16 == pytest.approx(2 * prompt_numbers, abs=16)  # 4 -> 2 bytes a number, same header
    assert fp16.history[1]["bytes_down_per_client"] < 0.6 * fp32.history[1]["bytes_down_per_client"]
    assert fp16.metric("global_accuracy")[-1] >= 0.6


def test_a_bad_client_is_rejected_and_the_round_goes_on(keyword_file, tmp_path, monkeypatch, caplog):
    original_fit = fedprompt.training.client.Client.fit

    def fit(self, global_state, instructions, carried=None):
        result = original_fit(self, global_state, instructions, carried)
        update = result.update
        if self.client_id == 1:  # a client that sends garbage
            garbage = {k: v * float("nan") for k, v in update.state.items()}
            return FitResult(Update(update.client_id, garbage, update.num_examples, update.metrics), {})
        if self.client_id == 2:  # a client that crashes
            raise RuntimeError("disk full")
        return result

    monkeypatch.setattr(fedprompt.training.client.Client, "fit", fit)
    result = fedprompt.run(tiny_run_config(keyword_file, federation={"rounds": 2}), output_dir=tmp_path)
    assert [r["clients_accepted"] for r in result.history[1:]] == [2, 2]
    assert [r["clients_rejected"] for r in result.history[1:]] == [2, 2]
    reasons = {r["client_id"]: r["reason"] for r in result.client_history if not r.get("accepted", True)}
    assert "non-finite" in reasons[1] and "RuntimeError: disk full" in reasons[2]
    assert "update of client 1 rejected" in caplog.text
    assert result.metric("global_accuracy")[-1] > result.metric("global_accuracy")[0]


def test_a_round_where_every_client_fails_stops_the_run(keyword_file, monkeypatch):
    def fit(self, *args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(fedprompt.training.client.Client, "fit", fit)
    with pytest.raises(
        RuntimeError, match="every sampled client failed; first reason: client failed: RuntimeError"
    ):
        fedprompt.run(tiny_run_config(keyword_file, federation={"rounds": 1}), write=False)


@pytest.mark.parametrize("strategy", [{"kind": "fedprox", "mu": 0.1}, {"kind": "median"}, {"kind": "krum"}])
def test_other_strategies_run_end_to_end(keyword_file, strategy):
    result = fedprompt.run(
        tiny_run_config(keyword_file, strategy=strategy, federation={"rounds": 2, "min_clients": 3}),
        write=False,
    )
    assert result.metric("global_accuracy")[-1] > result.metric("global_accuracy")[0]


def test_cli_fails_on_a_bad_config_before_loading_anything(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or data set was loaded for a bad config")

    monkeypatch.setattr("fedprompt.api.build_experiment", no_loading)
    out = CliRunner().invoke(app, ["run", "--set", "partition.alpah=0.1"])
    assert out.exit_code == 2
    assert "partition.alpah: is not a known field; allowed: kind, num_clients, alpha" in out.output


def test_cli_runs_a_config_file_and_prints_a_summary(keyword_file, tmp_path):
    import yaml

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config(keyword_file, federation={"rounds": 1})))
    out = CliRunner().invoke(
        app, ["run", str(config_file), "--output-dir", str(tmp_path / "runs"), "--no-progress"]
    )
    assert out.exit_code == 0, out.output
    assert "global acc" in out.output and "results:" in out.output
    assert len(list((tmp_path / "runs").glob("tiny-*/final_prompt.safetensors"))) == 1


@pytest.mark.slow
def test_embedded_default_job_learns():
    result = fedprompt.run(overrides=["federation.rounds=2", "runtime.progress=false"], write=False)
    acc = result.metric("global_accuracy")
    assert acc[-1] > acc[0] + 0.1, acc  # 21 topics: chance is under 0.05
    assert result.summary["bytes_up_over_backbone"] < 2e-4


def _sst2_files(tmp_path, n_train: int = 600, n_test: int = 400):
    folder = shared_dataset("sst2")
    files = {}
    for split, source, limit in (
        ("train", "stsa.binary.train", n_train),
        ("test", "stsa.binary.test", n_test),
    ):
        lines = (folder / source).read_text().splitlines()[:limit]
        target = tmp_path / f"sst2-{split}.jsonl"
        target.write_text(
            "".join(json.dumps({"text": line[2:], "label": int(line[0])}) + "\n" for line in lines)
        )
        files[split] = str(target)
    return files


@pytest.mark.slow
def test_minilm_on_real_sst2_learns(tmp_path):
    cfg = {
        "name": "minilm-sst2",
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": {
            "kind": "similarity",
            "label_descriptions": {"negative": "It was terrible.", "positive": "It was great."},
        },
        "prompt": {"num_tokens": 8, "init": "vocab"},
        "data": {"source": "files", "files": _sst2_files(tmp_path), "label_names": ["negative", "positive"]},
        "partition": {"kind": "iid", "num_clients": 4},
        "federation": {"rounds": 2, "min_clients": 2, "local_evaluation": False},
        "optimizer": {"lr": 0.01, "batch_size": 16},
        "runtime": {"progress": False},
    }
    acc = fedprompt.run(cfg, write=False).metric("global_accuracy")
    assert acc[-1] >= 0.72 and acc[-1] > acc[0] + 0.04, acc
