"""Shared fixtures: offline settings, tiny random backbones, the bundled MiniLM, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread here and in every process a test starts (Flower's apps, site workers, the
# service): on a busy 2-core machine two OpenMP threads spin at every barrier of a small forward
# pass and run it several times slower; several test processes at once oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


KEYWORDS = {
    "fruit": ["apple", "banana", "cherry"],
    "nature": ["river", "mountain", "forest"],
    "transport": ["car", "train", "plane"],
}
"""A task a prompt on a tiny random model can learn: the class is named by its keywords."""


def write_keyword_dataset(path: Path, n: int = 600, seed: int = 0) -> Path:
    """A jsonl file of short texts (1-3 class keywords and maybe a filler word) with string labels."""
    import json
    import random

    rng = random.Random(seed)
    names = list(KEYWORDS)
    with path.open("w") as out:
        for i in range(n):
            label = names[i % len(names)]
            words = rng.choices(KEYWORDS[label], k=rng.randint(1, 3)) + rng.choices(
                ["the", "a", "of"], k=rng.randint(0, 1)
            )
            rng.shuffle(words)
            out.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def tiny_run_config(data_file: Path, **sections) -> dict:
    """A seconds-long federated run on a tiny random BERT with a masked-LM verbaliser.

    The random model uses initializer_range 0.3: with BERT's default 0.02 a random network's
    outputs barely depend on its input, and no prompt can make them.
    """
    config = {
        "name": "tiny",
        "seed": 0,
        "backbone": {
            "model": "random",
            "random_config": {**TINY_BERT, "initializer_range": 0.3},
            "max_length": 16,
        },
        "head": {
            "kind": "verbalizer",
            "template": "{text} [MASK]",
            "label_words": {"fruit": ["red"], "nature": ["green"], "transport": ["blue"]},
        },
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "random", "init_std": 0.9},
        "data": {
            "source": "files",
            "files": {"train": str(data_file)},
            "test_split": None,
            "test_fraction": 0.25,
        },
        "partition": {"kind": "iid", "num_clients": 4, "local_val_fraction": 0.2},
        "federation": {"rounds": 4, "min_clients": 2},
        "optimizer": {"lr": 0.1, "epochs": 2, "batch_size": 8},
        "runtime": {"progress": False},
        "output": {"plot": False},
    }
    for name, values in sections.items():
        base = config.get(name, {})
        replaced = "kind" in values and values["kind"] != base.get("kind", values["kind"])
        config[name] = dict(values) if replaced and name == "head" else {**base, **values}
    return config


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """Every test runs torch on one intra-op thread (see OMP_NUM_THREADS above); restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The tiny open_clip model's config and checkpoint files and a generated image folder
    (tests/clip_support.py), written once per session."""
    from clip_support import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def single_thread():
    """Run a test on one CPU thread: the tiny CLIP's tensors are too small to gain from two, and
    two threads on a busy machine stall each other (a 50 µs matmul then takes milliseconds)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on loopback, serving the bundled SmolLM2 GGUF as
    ``smollm2`` (started once per session; skips without llama-cpp-python or the model)."""
    from llm_servers import (
        LLAMA_START_TIMEOUT,
        free_port,
        llama_server_command,
        need_llama_cpp,
        running_server,
        smollm2_gguf,
    )

    need_llama_cpp()
    gguf = smollm2_gguf()
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with running_server(llama_server_command(gguf, port), port, log, LLAMA_START_TIMEOUT) as url:
        yield url


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI-compatible server (its own virtual environment, CPU) on loopback, serving SmolLM2
    as a Hugging Face folder named ``smollm2``, with prompt embeddings enabled (started once per
    session; skips without the vLLM environment). ``FEDPROMPT_VLLM_URL`` names one already running."""
    from llm_servers import (
        VLLM_ENV,
        VLLM_START_TIMEOUT,
        free_port,
        need_vllm,
        running_server,
        smollm2_hf_folder,
        vllm_command,
    )

    running = os.environ.get("FEDPROMPT_VLLM_URL")  # a server already running, as vllm_command starts it
    if running:
        yield running
        return
    need_vllm()
    folder = smollm2_hf_folder()
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with running_server(vllm_command(folder, port), port, log, VLLM_START_TIMEOUT, VLLM_ENV) as url:
        yield url
