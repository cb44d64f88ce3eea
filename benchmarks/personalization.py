"""Personal prompts on label-skewed clients, and reliability weighting against noisy clients.

Part 1 (personalisation): the embedded default task (21 chat topics, bundled MiniLM, 8-token soft
prompt) split among 10 clients with Dirichlet(0.1) label skew. The global prompt of FedAvg, a
split prompt (``personalization.shared_tokens``: 4 vectors shared, 4 kept on each client) and
the fine-tune-after-federation baseline, each scored per client on the client's own held-out
split: prints the mean and worst client, and personal − global.

Part 2 (reliability weighting): IID clients, 2 of 10 (``--noisy``: which) training on shuffled
labels (their whole data, so their own validation accuracy is poor too). Prints the global prompt's
test accuracy for FedAvg and for reliability weighting, with and without the noisy clients, and the
personal prompts' mean accuracy on the clean clients' held-out splits.

    python benchmarks/personalization.py [--rounds 5] [--part 1|2|both] [--noisy 2 6]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fedprompt.config import load_config
from fedprompt.execution.simulation import run_in_process
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.registry import build_experiment

NOISY = (2, 6)
"""The clients that train on shuffled labels in part 2, unless ``--noisy`` names others."""


def base(args: argparse.Namespace, **sections) -> dict:
    config = {
        "name": "bench-personal",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": 32},
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "vocab"},
        "data": {"source": "builtin", "name": "chatterbot-corpus", "test_split": None, "test_fraction": 0.2},
        "federation": {"rounds": args.rounds, "min_clients": 2},
        "optimizer": {"lr": args.lr, "epochs": 1, "batch_size": 8},
        "payload": {"wire_dtype": "float16"},
        "runtime": {"progress": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def run(raw: dict, noisy: tuple[int, ...] = ()):
    cfg = load_config(raw)
    experiment = build_experiment(cfg)
    for cid in noisy:  # shuffle every label of the client, training and held-out alike
        client = experiment.clients[cid]
        for data in (client.train_data, client.val_data):
            if data is not None:
                generator = torch_generator(derive_seed(cfg.seed, "noisy", cid))
                labels = data.tensors["labels"]
                data.tensors["labels"] = labels[torch.randperm(len(labels), generator=generator)]
    return run_in_process(experiment, cfg)


def part_one(args: argparse.Namespace) -> None:
    skew = {"kind": "dirichlet", "alpha": 0.1, "num_clients": 10, "min_partition_size": 20}
    runs = {
        "fedavg (global prompt)": base(args, partition=skew),
        "split prompt (4 shared + 4 local)": base(args, partition=skew, personalization={"shared_tokens": 4}),
        "fedavg + fine-tune 20 steps": base(args, partition=skew, personalization={"finetune_steps": 20}),
    }
    print("Part 1: 21 chat topics, 10 clients, Dirichlet 0.1; accuracy on each client's held-out split")
    global_mean = None
    for name, raw in runs.items():
        start = time.perf_counter()
        last = run(raw).history[-1]
        if global_mean is None:
            global_mean = last["local_accuracy_mean"]
        key = (
            "personal"
            if "personal_accuracy_mean" in last
            else "finetuned"
            if "finetuned_accuracy_mean" in last
            else "local"
        )
        mean, worst = last[f"{key}_accuracy_mean"], last[f"{key}_accuracy_worst"]
        print(
            f"  {name:36s} mean {mean:.4f}  worst {worst:.4f}  (global prompt on the same splits "
            f"{last['local_accuracy_mean']:.4f}; personal - global {mean - global_mean:+.4f})  "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )


def part_two(args: argparse.Namespace) -> None:
    iid = {"kind": "iid", "num_clients": 10, "local_val_fraction": 0.2}
    noisy_clients = tuple(args.noisy)
    print(f"Part 2: 21 chat topics, 10 IID clients; clients {list(noisy_clients)} train on shuffled labels")
    results = {}
    for strategy in ({"kind": "fedavg"}, {"kind": "reliability", "alpha": args.alpha}):
        for noisy in ((), noisy_clients):
            start = time.perf_counter()
            result = run(base(args, partition=iid, strategy=strategy), noisy)
            accuracy = result.metric("global_accuracy")[-1]
            results[(strategy["kind"], bool(noisy))] = accuracy
            weights = result.history[-1].get("reliability_weights")
            shown = (
                f"; weights of the noisy clients {[round(weights[str(c)], 4) for c in noisy]}"
                f"; personal prompts, clean clients' mean {clean_personal_mean(result, noisy):.4f}"
                if weights
                else ""
            )
            print(
                f"  {strategy['kind']:12s} {'noisy' if noisy else 'clean':5s} global accuracy {accuracy:.4f}"
                f"{shown}  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    gain = results[("reliability", True)] - results[("fedavg", True)]
    gap = results[("reliability", False)] - results[("reliability", True)]
    print(f"  reliability - fedavg with noisy clients: {gain:+.4f} (aim >= +0.03)")
    print(f"  reliability clean - noisy: {gap:+.4f} (aim within 0.02)")


def clean_personal_mean(result, noisy: tuple[int, ...]) -> float:
    """The mean personal-prompt accuracy of the clients that trained on their true labels, last round."""
    last = max(r["round"] for r in result.client_history)
    rows = [
        r["personal_accuracy"]
        for r in result.client_history
        if r["event"] == "evaluate" and r["round"] == last and r["client_id"] not in noisy
    ]
    return sum(rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--alpha", type=float, default=1.0, help="reliability's pull toward the shared prompt"
    )
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    parser.add_argument(
        "--noisy", type=int, nargs="+", default=list(NOISY), help="part 2: the clients on shuffled labels"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.part in ("1", "both"):
        part_one(args)
    if args.part in ("2", "both"):
        part_two(args)


if __name__ == "__main__":
    main()
