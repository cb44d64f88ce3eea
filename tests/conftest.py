"""Shared fixtures: offline settings, tiny random backbones, the bundled MiniLM, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(
    os.environ.get("FEDPROMPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}


def shared_dataset(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real benchmark data {path} is absent (set FEDPROMPT_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def minilm():
    from prompt_modules.hf_text import HFTextBackbone

    return HFTextBackbone.load("bundled:all-MiniLM-L6-v2", max_length=48)


def tiny_backbone(random_config: dict, head: str = "lm", max_length: int = 32):
    from prompt_modules.hf_text import HFTextBackbone

    return HFTextBackbone.load(
        "random", head=head, random_config=random_config, max_length=max_length, seed=0
    )
