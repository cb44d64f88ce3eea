"""Poisoned clients against robust aggregation on SST-2 with the bundled MiniLM.

10 IID clients tune an 8-token soft prompt; 2 of them attack every round:

- ``scaled``: send the honest update scaled by -10 (θ_g − 10·(θ_k − θ_g));
- ``noise``: send θ_g plus Gaussian noise of the prompt's norm;
- ``label-flip``: train honestly on flipped labels;
- ``inflated``: train honestly but claim 10^6 examples (FedAvg weights by claimed counts).

For FedAvg, coordinate median, trimmed mean, Krum and Multi-Krum, without and with the
server's norm bound on each delta (``robustness.max_update_norm``), it prints the final accuracy
and its ratio to the clean FedAvg run. The attacks are in this script (wrapped client fits), not
in fedprompt. Reads SST-2 from ../shared/data/sst2 (or --data-dir).

    python benchmarks/poisoning.py [--train-examples 2000] [--rounds 4] [--rules fedavg,median]
                                   [--bounds both|none|bound]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fedprompt.config import load_config
from fedprompt.execution.simulation import run_in_process
from fedprompt.federation.state import Update
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.client import Client, FitResult

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
ATTACKERS = (3, 7)
RULES = {
    "fedavg": {"kind": "fedavg"},
    "median": {"kind": "median"},
    "trimmed-mean": {"kind": "trimmed-mean", "beta": 0.2},
    "krum": {"kind": "krum", "num_byzantine": 2},
    "multi-krum": {"kind": "krum", "num_byzantine": 2, "keep": 5},
}
ATTACKS = ("scaled", "noise", "label-flip", "inflated")


def write_split(source: Path, target: Path, limit: int | None) -> str:
    lines = source.read_text().splitlines()[:limit]
    target.write_text("".join(json.dumps({"text": line[2:], "label": int(line[0])}) + "\n" for line in lines))
    return str(target)


def config(files: dict[str, str], args: argparse.Namespace, strategy: dict, bound: float | None) -> dict:
    return {
        "name": "bench-poisoning",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": {
            "kind": "similarity",
            "label_descriptions": {"negative": "It was terrible.", "positive": "It was great."},
        },
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "vocab"},
        "data": {"source": "files", "files": files, "label_names": ["negative", "positive"]},
        "partition": {"kind": "iid", "num_clients": 10, "local_val_fraction": 0.0},
        "federation": {"rounds": args.rounds, "min_clients": 10, "local_evaluation": False},
        "optimizer": {"lr": args.lr, "epochs": 1, "batch_size": 8},
        "strategy": strategy,
        "robustness": {"max_update_norm": bound},
        "payload": {"wire_dtype": "float16"},
        "runtime": {"progress": False},
    }


def attack(client: Client, kind: str, seed: int) -> None:
    """Make ``client`` an attacker of ``kind`` (its ``fit`` wrapped, or its labels flipped)."""
    if kind == "label-flip":
        labels = client.train_data.tensors["labels"]
        client.train_data.tensors["labels"] = 1 - labels
        return
    honest = client.fit

    def fit(downlink, instructions, carried=None) -> FitResult:
        result = honest(downlink, instructions, carried)
        update = result.update
        if kind == "inflated":
            return FitResult(replace(update, num_examples=10**6), result.carried)
        generator = torch_generator(derive_seed(seed, "attack", client.client_id, instructions.round))
        state = {}
        for name, trained in update.state.items():
            base = downlink[name]
            if kind == "scaled":
                state[name] = base - 10 * (trained - base)
            else:  # noise of the prompt's norm
                noise = torch.randn(base.shape, generator=generator)
                state[name] = base + noise * base.norm() / noise.norm()
        return FitResult(Update(update.client_id, state, update.num_examples, update.metrics), result.carried)

    client.fit = fit


def run(files, args, strategy, bound, kind) -> float:
    cfg = load_config(config(files, args, strategy, bound))
    experiment = build_experiment(cfg)
    if kind is not None:
        for cid in ATTACKERS:
            attack(experiment.clients[cid], kind, args.seed)
    return run_in_process(experiment, cfg).metric("global_accuracy")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--bound", type=float, default=1.0, help="the norm bound of the bounded runs")
    parser.add_argument(
        "--bounds", choices=["both", "none", "bound"], default="both", help="which runs of each rule"
    )
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"SST-2 not found at {args.data_dir}; pass --data-dir")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    tmp = Path(tempfile.mkdtemp())
    files = {
        "train": write_split(args.data_dir / "stsa.binary.train", tmp / "train.jsonl", args.train_examples),
        "test": write_split(args.data_dir / "stsa.binary.dev", tmp / "test.jsonl", args.test_examples),
    }
    start = time.perf_counter()
    clean = run(files, args, RULES["fedavg"], None, None)
    print(f"clean FedAvg: {clean:.4f}", flush=True)
    rules = args.rules.split(",")
    attacks = args.attacks.split(",")
    rows = []
    for rule in rules:
        bounds = {"both": (None, args.bound), "none": (None,), "bound": (args.bound,)}[args.bounds]
        for bound in bounds:
            accuracies = {kind: run(files, args, RULES[rule], bound, kind) for kind in attacks}
            rows.append((rule, bound, accuracies))
            shown = "  ".join(f"{k} {a:.4f} ({a / clean:.3f}x)" for k, a in accuracies.items())
            print(f"{rule:13s} bound {bound!s:5s} {shown}", flush=True)
    print(
        f"\nSST-2 dev, 10 IID clients, attackers {list(ATTACKERS)}, {args.rounds} rounds, "
        f"{args.train_examples} training examples; clean FedAvg {clean:.4f}"
    )
    print(f"{'rule':13s} {'bound':>6s} " + " ".join(f"{k:>16s}" for k in attacks))
    for rule, bound, accuracies in rows:
        cells = " ".join(f"{a:7.4f} ({a - clean:+.3f})" for a in accuracies.values())
        print(f"{rule:13s} {bound!s:>6s} {cells}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
