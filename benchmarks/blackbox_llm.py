"""Black-box tuning of SmolLM2-135M through the servers model owners run (llama.cpp), on SST-2.

Three measurements, each against a baseline run in the same process:

- ``bdpl``: federated BDPL (FedOne: one client a round) through llama.cpp's OpenAI-compatible
  server, started here on loopback with the bundled GGUF; final test accuracy against the same
  model's zero-shot accuracy (no prompt) through the same server, and the requests and tokens per
  client per round as the server counted them.
- ``fedbpt``: FedBPT through the ``llama-cpp`` adapter's low-level embeddings input, same model,
  task and template, against the same zero-shot accuracy.
- ``rank``: one CMA-ES population (candidates around z = 0 at the FedBPT σ) scored on the same
  inputs through ``fedprompt serve`` on transformers (the GGUF dequantised to float32) and
  through the ``llama-cpp`` adapter (llama.cpp's quantised kernels): Spearman's rank correlation
  of the two fitness vectors and their largest difference.

    python benchmarks/blackbox_llm.py bdpl --rounds 16
    python benchmarks/blackbox_llm.py fedbpt --rounds 6
    python benchmarks/blackbox_llm.py rank
    ... --quick        # a smoke run of the whole script

SST-2 is read from ../shared/data/sst2 (``LABEL SENTENCE`` lines; --data to point elsewhere).
The template: "Review: {text}\\nIs this review positive or negative? Answer:" with label words
negative/positive (SmolLM2's zero-shot is above chance with it, and not at its ceiling).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import fedprompt
from fedprompt.config import load_config

LABELS = ("negative", "positive")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TEMPLATE = "Review: {text}\nIs this review positive or negative? Answer:"
HEAD = {
    "kind": "verbalizer",
    "template": TEMPLATE,
    "label_words": {"negative": ["negative"], "positive": ["positive"]},
}


def sst2_jsonl(source: Path, name: str, out: Path) -> Path:
    with out.open("w") as handle:
        for line in (source / name).read_text().splitlines():
            label, _, text = line.partition(" ")
            handle.write(json.dumps({"text": text, "label": LABELS[int(label)]}) + "\n")
    return out


def data_section(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    train = sst2_jsonl(args.data, "stsa.binary.train", folder / "train.jsonl")
    test = sst2_jsonl(args.data, "stsa.binary.dev", folder / "test.jsonl")
    return {
        "source": "files",
        "files": {"train": str(train), "test": str(test)},
        "max_per_class": args.train_per_class,
        "max_test_examples": args.test_examples,
    }


def gguf_path() -> Path:
    from prompt_modules.bundled import BUNDLED_MODELS

    bundled = BUNDLED_MODELS["smollm2-135m"]
    return bundled.locate() / bundled.gguf_file


@contextlib.contextmanager
def llama_server(log: Path) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port with the bundled SmolLM2 GGUF."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf_path()),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "1024",
    ]
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"llama.cpp's server exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama.cpp's server did not start in 300 s")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=30)


def base(args: argparse.Namespace, data: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "name": name,
        "seed": args.seed,
        "head": HEAD,
        "data": data,
        "partition": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0},
        "runtime": {"progress": False, "eval_batch_size": 50},
    }


def zero_shot(args: argparse.Namespace, data: dict[str, Any], backbone: dict[str, Any]) -> float:
    """The accuracy with no prompt at all: the plain template, through the same server."""
    from fedprompt.data.loading import load_text_classification
    from fedprompt.seeding import derive_seed
    from fedprompt.tasks.text.language_model import endpoint_client
    from prompt_modules.hf_text import load_tokenizer
    from prompt_modules.label_scores import LabelWords
    from prompt_modules.openai_scorer import OpenAIScorer

    config = load_config(
        {
            **base(args, data, "zero-shot"),
            "backbone": backbone,
            "prompt": {"kind": "discrete"},
            "optimizer": {"kind": "bdpl"},
        }
    )
    loaded = load_text_classification(config.data, seed=derive_seed(config.seed, "data"))
    labels = LabelWords.from_tokenizer(load_tokenizer("bundled:smollm2-135m"), [[w] for w in LABELS])
    scorer = OpenAIScorer(
        endpoint_client(config.backbone), "smollm2", "completions", config.backbone.top_logprobs
    )
    texts = [TEMPLATE.format(text=t) for t in loaded.test["text"]]
    scores = scorer.score_texts(texts, labels)
    truth = torch.tensor(loaded.test["label"])
    return float((labels.class_scores(scores.logprobs).argmax(1) == truth).float().mean())


def per_client_round(result: Any) -> dict[str, float]:
    rows = [row for row in result.client_history if row["accepted"]]
    keys = ("api_requests", "api_prompt_tokens", "api_completion_tokens", "queries", "floored_share")
    return {key: sum(row.get(key, 0.0) for row in rows) / len(rows) for key in keys}


def bdpl(args: argparse.Namespace, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    with llama_server(folder / "llama-server.log") as url:
        backbone = {
            "kind": "openai",
            "url": url,
            "model": "smollm2",
            "tokenizer": "bundled:smollm2-135m",
            "concurrency": 1,
            "top_logprobs": args.top_logprobs,
        }
        start = time.perf_counter()
        baseline = zero_shot(args, data, backbone)
        zero_seconds = time.perf_counter() - start
        config = {
            **base(args, data, "fedone-bdpl-llama-cpp-server"),
            "backbone": backbone,
            "prompt": {
                "kind": "discrete",
                "num_tokens": args.positions,
                "vocabulary": {"size": args.candidates},
            },
            "optimizer": {
                "kind": "bdpl",
                "samples": args.samples,
                "steps": args.steps,
                "batch_size": args.batch,
                "lr": args.lr,
            },
            "strategy": {"kind": "fedavg"},
            "federation": {
                "rounds": args.rounds,
                "min_clients": 1,
                "fraction": 1 / args.clients,
                "local_evaluation": False,
                "evaluate_every": args.evaluate_every,
            },
        }
        start = time.perf_counter()
        result = fedprompt.run(config, write=False)
        seconds = time.perf_counter() - start
    accuracy = result.metric("global_accuracy")
    return {
        "zero_shot_accuracy": baseline,
        "zero_shot_seconds": zero_seconds,
        "accuracy_by_evaluation": accuracy,
        "final_accuracy": accuracy[-1],
        "gain_over_zero_shot": accuracy[-1] - baseline,
        "ratio_to_zero_shot": accuracy[-1] / baseline,
        "per_client_round": per_client_round(result),
        "seconds": seconds,
        "rounds": args.rounds,
    }


def fedbpt(args: argparse.Namespace, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    with llama_server(folder / "llama-server.log") as url:
        baseline = zero_shot(args, data, {"kind": "openai", "url": url, "model": "smollm2"})
    config = {
        **base(args, data, "fedbpt-llama-cpp"),
        "backbone": {"kind": "llama-cpp", "max_length": 64, "threads": 1},
        "prompt": {"kind": "intrinsic", "dim": args.dim, "num_tokens": args.prompt_tokens},
        "optimizer": {
            "kind": "cmaes",
            "popsize": args.popsize,
            "sigma": 1.0,
            "generations": args.generations,
            "score_on": "batch",
            "batch_size": args.batch,
        },
        "strategy": {"kind": "fedbpt", "rule": "cma", "sigma_floor": 0.5},
        "federation": {
            "rounds": args.rounds,
            "min_clients": args.clients,
            "local_evaluation": False,
            "evaluate_every": args.evaluate_every,
        },
    }
    start = time.perf_counter()
    result = fedprompt.run(config, write=False)
    seconds = time.perf_counter() - start
    accuracy = result.metric("global_accuracy")
    return {
        "zero_shot_accuracy": baseline,
        "accuracy_by_evaluation": accuracy,
        "final_accuracy": accuracy[-1],
        "gain_over_zero_shot": accuracy[-1] - baseline,
        "ratio_to_zero_shot": accuracy[-1] / baseline,
        "parity": result.summary["parity"],
        "per_client_round": per_client_round(result),
        "seconds": seconds,
    }


def rank(args: argparse.Namespace, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One population through fedprompt serve (transformers, the GGUF dequantised) and the llama-cpp
    adapter (quantised kernels), on the same inputs."""
    from fedprompt.serving import InferenceService, create_app, serve_in_thread
    from fedprompt.tasks.registry import build_experiment
    from fedprompt.tasks.text.remote import build_remote_model
    from prompt_modules.hf_text import HFTextBackbone

    sections = {
        **base(args, data, "rank"),
        "prompt": {"kind": "intrinsic", "dim": args.dim, "num_tokens": args.prompt_tokens},
        "optimizer": {"kind": "cmaes", "popsize": args.popsize, "generations": 1},
        "strategy": {"kind": "fedbpt"},
    }
    local = load_config({**sections, "backbone": {"kind": "llama-cpp", "max_length": 64, "threads": 1}})
    experiment = build_experiment(local, client_ids=[0])
    batch = next(experiment.clients[0].train_data.batches(args.batch))
    population = torch.randn(args.population, args.dim, generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    adapter = experiment.model.population_losses(population, batch).double()
    adapter_seconds = time.perf_counter() - start

    served = HFTextBackbone.load("bundled:smollm2-135m", head="lm", max_length=64)
    service = InferenceService(served, "bundled:smollm2-135m")
    token = secrets.token_hex(16)
    os.environ["FEDPROMPT_RANK_TOKEN"] = token
    with serve_in_thread(create_app(service, {"rank": token})) as url:
        remote = load_config(
            {
                **sections,
                "backbone": {
                    "kind": "remote",
                    "url": url,
                    "token_env": "FEDPROMPT_RANK_TOKEN",
                    "tokenizer": "bundled:smollm2-135m",
                    "timeout": 3600,
                },
            }
        )
        model, _ = build_remote_model(remote, remote.backbone, experiment.label_names)
        start = time.perf_counter()
        service_losses = model.population_losses(population, batch).double()
        service_seconds = time.perf_counter() - start
    return {
        "population": args.population,
        "inputs": len(batch["labels"]),
        "spearman": spearman(adapter, service_losses),
        "largest_difference": float((adapter - service_losses).abs().max()),
        "adapter_losses": adapter.tolist(),
        "service_losses": service_losses.tolist(),
        "adapter_seconds": adapter_seconds,
        "service_seconds": service_seconds,
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [
        torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(len(x), dtype=x.dtype)) for x in (a, b)
    ]
    x, y = (r - r.mean() for r in ranks)
    return float((x * y).sum() / (x.norm() * y.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["bdpl", "fedbpt", "rank"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--evaluate-every", type=int, default=4)
    parser.add_argument("--positions", type=int, default=5, help="BDPL: prompt positions n")
    parser.add_argument("--candidates", type=int, default=30, help="BDPL: candidates K")
    parser.add_argument("--samples", type=int, default=8, help="BDPL: prompts drawn per step I")
    parser.add_argument("--steps", type=int, default=5, help="BDPL: local steps per round")
    parser.add_argument("--lr", type=float, default=0.5, help="BDPL: Adam's learning rate on the logits")
    parser.add_argument("--top-logprobs", type=int, default=20, help="BDPL: log-probabilities asked per text")
    parser.add_argument("--batch", type=int, default=8, help="examples per step / generation")
    parser.add_argument("--dim", type=int, default=50, help="FedBPT: d")
    parser.add_argument("--prompt-tokens", type=int, default=5, help="FedBPT: prompt vectors m")
    parser.add_argument("--popsize", type=int, default=5)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--population", type=int, default=20, help="rank: candidates scored both ways")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"SST-2 is not at {args.data}; give --data")
    if args.quick:
        args.rounds, args.evaluate_every, args.test_examples, args.train_per_class = 2, 1, 16, 10
        args.steps, args.samples, args.generations, args.population, args.clients = 1, 2, 1, 4, 2
    with tempfile.TemporaryDirectory() as tmp:
        data = data_section(args, Path(tmp))
        out = {"bdpl": bdpl, "fedbpt": fedbpt, "rank": rank}[args.what](args, data, Path(tmp))
    for key, value in out.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
