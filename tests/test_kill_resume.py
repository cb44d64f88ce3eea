"""A run killed mid-round (SIGKILL between a client's fit and the round's checkpoint) resumes and
ends with the bit-identical global prompt, server state and client states of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedprompt

from conftest import tiny_run_config, write_keyword_dataset

KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import fedprompt
    from fedprompt.training.client import Client

    config, output, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    original, calls = Client.fit, []

    def fit(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(self.client_id)
        if len(calls) == kill_at:  # the fit is done, its round is not yet checkpointed
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Client.fit = fit
    fedprompt.run(config, output_dir=output)
    """
)


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _kill_and_resume(config: dict, tmp_path: Path, kill_at: int):
    """(the uninterrupted run, the killed-then-resumed run)."""
    straight = fedprompt.run(config, output_dir=tmp_path / "straight")
    killed_dir = tmp_path / "killed"
    process = subprocess.run(
        [sys.executable, "-c", KILLER, json.dumps(config), str(killed_dir), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    (folder,) = killed_dir.iterdir()
    checkpoint = load_file(folder / "checkpoint.safetensors")
    assert checkpoint  # at least one complete round was checkpointed before the kill
    resumed = fedprompt.run(resume=folder)
    return straight, resumed


def _assert_same_run(straight, resumed) -> None:
    for name, tensor in straight.final_state.items():
        assert torch.equal(resumed.final_state[name], tensor), name
    a = load_file(straight.run_dir / "checkpoint.safetensors")
    b = load_file(resumed.run_dir / "checkpoint.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:  # the global prompt, the whole server state (moments, CMA-ES), the client states
        assert torch.equal(a[key], b[key]), key
    assert [r["global_accuracy"] for r in resumed.history] == [r["global_accuracy"] for r in straight.history]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sections",
    [
        {"strategy": {"kind": "fedavg"}},
        {"strategy": {"kind": "fedadam", "server_lr": 0.05}},
        {"strategy": {"kind": "fedavg"}, "personalization": {"shared_tokens": 4}},
    ],
    ids=["fedavg", "fedadam", "split-prompt"],
)
def test_gradient_runs_resume_bit_identically_after_a_kill(keywords, tmp_path, sections):
    config = tiny_run_config(keywords, federation={"rounds": 3}, **sections)
    straight, resumed = _kill_and_resume(config, tmp_path, kill_at=6)  # round 2, second client
    _assert_same_run(straight, resumed)
    if "personalization" in sections:
        assert any(k.startswith("client/") for k in load_file(resumed.run_dir / "checkpoint.safetensors"))


@pytest.mark.slow
def test_fedbpt_resumes_its_whole_cma_state_after_a_kill(keywords, tmp_path):
    config = tiny_run_config(keywords, federation={"rounds": 3})
    config["prompt"] = {"kind": "intrinsic", "dim": 50, "num_tokens": 4}
    config["optimizer"] = {"kind": "cmaes", "popsize": 8, "budget": 8 * 16 * 3, "batch_size": 16}
    config["strategy"] = {"kind": "fedbpt"}
    straight, resumed = _kill_and_resume(config, tmp_path, kill_at=7)  # round 2, third client
    _assert_same_run(straight, resumed)
    cma = [k for k in load_file(straight.run_dir / "checkpoint.safetensors") if k.startswith("strategy/cma/")]
    assert len(cma) > 3  # mean, step size, covariance, evolution paths: all compared above


@pytest.mark.slow
def test_atpfl_resumes_its_clients_previous_prompts_after_a_kill(tiny_clip, tmp_path):
    from clip_support import clip_run_config

    prompt = {
        "kind": "twin",
        "text": {"num_tokens": 4},
        "visual": {"kind": "pixel", "size": 8},
        "contrastive": True,
    }
    config = clip_run_config(
        tiny_clip,
        prompt,
        {"source": "image-folder", "name": str(tiny_clip.generated)},
        optimizer={"epochs": 1},
    )
    straight, resumed = _kill_and_resume(config, tmp_path, kill_at=5)  # round 2, second client
    _assert_same_run(straight, resumed)
    previous = [k for k in load_file(resumed.run_dir / "checkpoint.safetensors") if "/previous/" in k]
    assert previous  # ATPFL's previous local prompts are part of the run's checkpoint
