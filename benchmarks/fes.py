"""FeS (few-shot clients with pseudo-labels) against labelled-only and all-labelled training, on
SST-2 or TREC with the bundled MiniLM and a soft prompt.

Three federated runs on the same data, clients and rounds:

- labelled-only: each client keeps `--labels` labels per class (data.labelled_per_class) and trains
  on them alone;
- FeS: the same labels, plus pseudo-labels of the rest of each client's split, admitted by the
  curriculum (pseudo_labels: pace, threshold, vote-k candidates);
- all-labelled: every training example of every client keeps its label (the upper bound).

Prints each final test accuracy and FeS's margins: over labelled-only (aim: ≥ +0.03) and under
all-labelled (aim: ≤ 0.05). Reads ../shared/data (or --data-dir).

    python benchmarks/fes.py [--task sst2|trec] [--train-examples 1200] [--rounds 5] [--labels 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpeptao import SHARED, write_task  # the same data files as the FedPepTAO benchmark

import fedprompt


def config(files: dict[str, str], head: dict, labels: list[str], args: argparse.Namespace) -> dict:
    return {
        "name": "bench-fes",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": dict(head),
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "vocab"},
        "data": {"source": "files", "files": files, "label_names": labels, "test_split": "test"},
        "partition": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0.0},
        "federation": {"rounds": args.rounds, "fraction": 1.0, "local_evaluation": False},
        "optimizer": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size},
        "payload": {"wire_dtype": "float16"},
        "runtime": {"progress": False},
        "output": {"plot": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=["sst2", "trec"], default="sst2")
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--train-examples", type=int, default=1200)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--labels", type=int, default=16, help="labels per class per client")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pace", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--diverse-fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        files, head = write_task(args.task, args.data_dir, Path(folder), args.train_examples)
        labels = head.pop("_labels")
        base = config(files, head, labels, args)
        few = {**base["data"], "labelled_per_class": args.labels}
        pseudo = {"pace": args.pace, "threshold": args.threshold, "diverse_fraction": args.diverse_fraction}
        runs = {
            "labelled-only": {**base, "data": few},
            "FeS": {**base, "data": few, "pseudo_labels": pseudo},
            "all-labelled": base,
        }
        accuracy = {}
        for name, raw in runs.items():
            start = time.perf_counter()
            result = fedprompt.run(raw, write=False)
            curve = result.metric("global_accuracy")
            accuracy[name] = curve[-1]
            admitted = [r.get("pseudo_labels", 0) for r in result.client_history if r.get("event") == "fit"]
            extra = (
                f", pseudo-labels admitted per fit {admitted[: args.clients * args.rounds : args.clients]}"
            )
            print(
                f"{name:14s} accuracy {curve[-1]:.4f} (by round {[round(a, 3) for a in curve]})"
                f"{extra if name == 'FeS' else ''}, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    print(
        f"FeS - labelled-only = {accuracy['FeS'] - accuracy['labelled-only']:+.4f} (aim >= +0.03); "
        f"all-labelled - FeS = {accuracy['all-labelled'] - accuracy['FeS']:+.4f} (aim <= 0.05)"
    )


if __name__ == "__main__":
    main()
