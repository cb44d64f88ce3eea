"""Run folders written by an earlier release resume with today's code: the configuration hash
still matches, the checkpoint (prompt, server state, client states) loads, and the continued run
ends at the prompt that release computed when it continued the same folder.

The folders under ``tests/data/legacy_runs`` were written by the code before the package was
regrouped (commit aeb29f3): two rounds of a tiny random BERT on the builtin corpus, FedAvg and
SCAFFOLD (server and client control variates in the checkpoint). Each ``*.expected-round3``
file is the final prompt that code reached when it resumed the folder for a third round.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedprompt

LEGACY = Path(__file__).parent / "data" / "legacy_runs"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["legacy-fedavg", "legacy-scaffold"])
def test_a_run_folder_written_before_the_regrouping_resumes_to_the_same_prompt(name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(LEGACY / name, folder)
    result = fedprompt.run(resume=folder, overrides=["federation.rounds=3"])
    assert [row["round"] for row in result.history] == [0, 1, 2, 3]
    expected = load_file(LEGACY / f"{name}.expected-round3.safetensors")
    assert sorted(result.final_state) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(result.final_state[key], tensor, rtol=0, atol=1e-6)
