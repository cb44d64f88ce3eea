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

With ``--co-plan`` it compares, instead, FeS on a deep prefix prompt at every layer (a fixed depth,
at ``--pace``) with FeS co-planned (pseudo_labels.co_planning over ``--depths`` × ``--capacities``):
each run's final accuracy, its plans, its training compute in layer passes and its wall time, and
the co-planned run's ratios of both to the fixed run's.

    python benchmarks/fes.py [--task sst2|trec] [--train-examples 1200] [--rounds 5] [--labels 16]
    python benchmarks/fes.py --co-plan [--depths 2 6] [--capacities 0.1 0.3]
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

DEEP_PROMPT = {"kind": "deep", "mode": "prefix", "num_tokens": 4, "init": "vocab"}


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
    parser.add_argument("--co-plan", action="store_true", help="fixed depth against co-planned, deep prompt")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.1, 0.3])
    args = parser.parse_args()
    if args.co_plan:
        co_plan(args)
        return

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


def co_plan(args: argparse.Namespace) -> None:
    """FeS on a deep prompt: every layer trained at --pace against the co-planner's choice."""
    with tempfile.TemporaryDirectory() as folder:
        files, head = write_task(args.task, args.data_dir, Path(folder), args.train_examples)
        labels = head.pop("_labels")
        base = config(files, head, labels, args)
        base = {**base, "prompt": DEEP_PROMPT, "data": {**base["data"], "labelled_per_class": args.labels}}
        pseudo = {"threshold": args.threshold, "diverse_fraction": args.diverse_fraction}
        plan = {"depths": args.depths, "capacities": args.capacities}
        runs = {
            "every layer": {**base, "pseudo_labels": {**pseudo, "pace": args.pace}},
            "co-planned": {**base, "pseudo_labels": {**pseudo, "co_planning": plan}},
        }
        measured = {}
        for name, raw in runs.items():
            start = time.perf_counter()
            result = fedprompt.run(raw, write=False)
            seconds = time.perf_counter() - start
            curve = result.metric("global_accuracy")
            fits = [r for r in result.client_history if r.get("event") == "fit"]
            layers = 6  # MiniLM: every layer is prompted, 6 forward and 6 backward layers per example
            depths = [int(r.get("plan_depth", layers)) for r in fits]
            passes = sum(r["examples_seen"] * (layers + 2 * d) for r, d in zip(fits, depths, strict=True))
            measured[name] = (curve[-1], passes, seconds)
            plans = [(int(r["plan_depth"]), r["plan_capacity"]) for r in fits if "plan_depth" in r]
            print(
                f"{name:12s} accuracy {curve[-1]:.4f} (by round {[round(a, 3) for a in curve]}), training "
                f"{passes:.0f} layer passes, {seconds:.0f} s"
                + (f", plans of client 0 by round {plans[:: args.clients]}" if plans else ""),
                flush=True,
            )
    (a, pa, sa), (b, pb, sb) = measured["every layer"], measured["co-planned"]
    print(
        f"co-planned - every layer = {b - a:+.4f} accuracy; co-planned / every layer: "
        f"{pb / pa:.2f}x the training layer passes, {sb / sa:.2f}x the wall time"
    )


if __name__ == "__main__":
    main()
