"""Federated against centralised prompt tuning on skewed, many-class text tasks, per strategy.

Tasks: TREC (6 question types), AG News (4 topics; its test split, split here into train and test
with a fixed seed) and SST-2 (2 classes), from ../shared/data. Backbone and prompt as in
benchmarks/federated_vs_centralised.py: the bundled MiniLM, an 8-token soft prompt, the similarity
head with one description per class. Same examples seen: the centralised run is one client
holding the whole training set, the federated runs split it among --clients clients (Dirichlet
label skew, or IID), every client trains every round, the same rounds of the same local epochs.

Each method runs the budget of --rounds rounds, then is given more, --rounds at a time (resumed
from its checkpoint: the same as one longer run at a constant learning rate), until it reaches
0.98× of the centralised final accuracy or --more-rounds budgets. Printed per task, split and
method: the accuracy at the budget's last round ("final") and its best round, both over the
centralised final accuracy, and the rounds the method needs to reach 0.95× and 0.98× of it.

Tuning (--tune): every method, and the centralised baseline, gets the same number of trials
(TRIALS: three settings each, over the method's own knob), run for the budget's rounds on a
validation split carved from the training set (the test set is never used to choose); the best
setting then runs on the test set. --settings reuses the settings a --json report chose (with
--tune, only the methods it lacks are tuned).

    python benchmarks/skew.py --tasks trec --clients 10 --partitions dirichlet0.5 --train-examples 1200
    python benchmarks/skew.py --clients 10,50 --partitions iid,dirichlet0.5,dirichlet0.1
    python benchmarks/skew.py --tasks trec --tune --json trec.json      # choose settings on TREC
    python benchmarks/skew.py --tasks agnews --settings trec.json       # and use them elsewhere
    python benchmarks/skew.py --tasks trec --settings trec.json --local-steps 1  # average every step
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fedprompt

DATA = Path(os.environ.get("FEDPROMPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A labelled text task: how to read its files, its classes and their descriptions."""

    name: str
    labels: dict[str, str]
    """Label name -> the description the similarity head scores against."""
    read: Callable[[Path, int], tuple[list[dict], list[dict]]]
    """(data folder, seed) -> (train rows, test rows) of {"text", "label"}."""


def _trec(folder: Path, seed: int) -> tuple[list[dict], list[dict]]:
    def rows(file: str) -> list[dict]:
        out = []
        for line in (folder / "trec" / file).read_text(encoding="latin-1").splitlines():
            tag, _, question = line.partition(" ")
            out.append({"text": question, "label": tag.split(":")[0]})
        return out

    return rows("train.txt"), rows("test.txt")


AGNEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}


def _agnews(folder: Path, seed: int, test_size: int = 1600) -> tuple[list[dict], list[dict]]:
    with (folder / "agnews" / "test.csv").open(newline="", encoding="utf-8") as handle:
        rows = [
            {"text": f"{r['Title']}. {r['Description']}", "label": AGNEWS_CLASSES[r["Class Index"]]}
            for r in csv.DictReader(handle)
        ]
    random.Random(seed).shuffle(rows)  # the fixed split: the same seed gives the same train and test
    return rows[test_size:], rows[:test_size]


def _sst2(folder: Path, seed: int) -> tuple[list[dict], list[dict]]:
    def rows(file: str) -> list[dict]:
        lines = (folder / "sst2" / file).read_text().splitlines()
        return [{"text": line[2:], "label": "positive" if line[0] == "1" else "negative"} for line in lines]

    return rows("stsa.binary.train"), rows("stsa.binary.dev")


TASKS = {
    "trec": Task(
        "trec",
        {
            "ABBR": "This asks for an abbreviation or what it stands for.",
            "DESC": "This asks for a description, definition or reason.",
            "ENTY": "This asks about a thing, an object or an entity.",
            "HUM": "This asks about a person or a group of people.",
            "LOC": "This asks about a place or location.",
            "NUM": "This asks for a number, a date or an amount.",
        },
        _trec,
    ),
    "agnews": Task(
        "agnews",
        {
            "World": "This is news about world politics.",
            "Sports": "This is news about sports.",
            "Business": "This is news about business and the economy.",
            "Sci/Tech": "This is news about science and technology.",
        },
        _agnews,
    ),
    "sst2": Task("sst2", {"negative": "It was terrible.", "positive": "It was great."}, _sst2),
}


def subsample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most ``limit`` rows, drawn with a fixed seed (all of them for None)."""
    if limit is None or limit >= len(rows):
        return rows
    return random.Random(seed).sample(rows, limit)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --------------------------------------------------------------------------- methods

Overrides = dict[str, dict[str, Any]]
"""Config sections a method sets (merged over the base config)."""

ADAMW = {"algorithm": "adamw"}
SGD = {"algorithm": "sgd", "momentum": 0.9, "grad_clip": None}
"""SCAFFOLD's local optimiser: SGD with momentum (its gradient scale turns (x − y_i) back into a
gradient) and no clipping, as the paper trains."""


def method(strategy: dict[str, Any], optimizer: dict[str, Any] | None = None) -> Overrides:
    return {"strategy": strategy, "optimizer": dict(optimizer or ADAMW)}


DEFAULTS: dict[str, Overrides] = {
    "central": method({"kind": "fedavg"}),
    "fedavg": method({"kind": "fedavg"}),
    "fedprox": method({"kind": "fedprox", "mu": 0.01}),
    "scaffold": method({"kind": "scaffold"}, {**SGD, "lr": 0.15}),
    "fedavg-sgd": method({"kind": "fedavg"}, {**SGD, "lr": 0.15}),
    "feddyn": method({"kind": "feddyn", "alpha": 0.01}),
    "fedavgm": method({"kind": "fedavgm", "server_lr": 1.0, "momentum": 0.5}),
    "fednova": method({"kind": "fednova"}),
    "fedadam": method({"kind": "fedadam", "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
}
"""Each method's setting without tuning (FedAvg, FedProx, FedDyn, FedAvgM, FedNova and FedAdam train
with AdamW at --lr; SCAFFOLD needs SGD, whose learning rate is its own, and FedAvg with the same SGD
is its control: what the correction adds, apart from the local optimiser)."""

SGD_LRS = (0.05, 0.15, 0.5)
"""SGD's trial learning rates (a first grid, 0.005-0.05, had its best at its top edge on TREC)."""

TRIALS: dict[str, list[Overrides]] = {
    "central": [method({"kind": "fedavg"}, {**ADAMW, "lr": lr}) for lr in (0.003, 0.01, 0.03)],
    "fedavg": [method({"kind": "fedavg"}, {**ADAMW, "lr": lr}) for lr in (0.003, 0.01, 0.03)],
    "fedprox": [method({"kind": "fedprox", "mu": mu}) for mu in (0.001, 0.01, 0.1)],
    "scaffold": [method({"kind": "scaffold"}, {**SGD, "lr": lr}) for lr in SGD_LRS],
    "fedavg-sgd": [method({"kind": "fedavg"}, {**SGD, "lr": lr}) for lr in SGD_LRS],
    "feddyn": [method({"kind": "feddyn", "alpha": alpha}) for alpha in (0.001, 0.01, 0.1)],
    "fedavgm": [
        method({"kind": "fedavgm", "server_lr": lr, "momentum": beta})
        for lr, beta in ((1.0, 0.5), (0.5, 0.9), (1.5, 0.0))
    ],
    "fednova": [method({"kind": "fednova"}, {**ADAMW, "lr": lr}) for lr in (0.003, 0.01, 0.03)],
    "fedadam": [
        method({"kind": "fedadam", "server_lr": lr, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3})
        for lr in (0.003, 0.01, 0.03)
    ],
}
"""The tuning grid: three trials per method, each over the knob that method adds (the client lr for
FedAvg, FedNova and SCAFFOLD's SGD; μ, α, the server lr and momentum, FedAdam's server lr), and
the same three learning rates for the centralised baseline."""

SHARED_LR = ("fedprox", "feddyn", "fedavgm", "fedadam")
"""Methods whose trials tune their own knob at the client learning rate FedAvg's trials chose."""


def merge(base: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for section, values in overrides.items():
        out[section] = {**out.get(section, {}), **values}
    return out


# --------------------------------------------------------------------------- runs


def base_config(task: Task, files: dict[str, str], args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    return {
        "name": f"skew-{task.name}",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": args.max_length},
        "head": {"kind": "similarity", "label_descriptions": dict(task.labels)},
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "vocab"},
        "data": {"source": "files", "files": files, "label_names": list(task.labels)},
        "federation": {"rounds": rounds, "fraction": 1.0, "min_clients": 1, "local_evaluation": False},
        "optimizer": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size},
        "payload": {"wire_dtype": "float32"},
        "runtime": {"progress": False},
    }


def partition(split: str, clients: int, min_size: int = 2) -> dict[str, Any]:
    if split == "central":
        return {"kind": "iid", "num_clients": 1, "local_val_fraction": 0.0}
    if split == "iid":
        return {"kind": "iid", "num_clients": clients, "local_val_fraction": 0.0}
    kind = "dirichlet_per_client" if split.startswith("dirichlet_per_client") else "dirichlet"
    alpha = float(split.removeprefix(kind))
    return {
        "kind": kind,
        "alpha": alpha,
        "num_clients": clients,
        "local_val_fraction": 0.0,
        "min_partition_size": min_size,
    }


def grow(
    config: dict[str, Any], budget: int, limit: int, goal: float, folder: Path
) -> tuple[list[float], float]:
    """(global accuracy per round from round 0, seconds): ``budget`` rounds, then ``budget`` more at
    a time (resumed from the checkpoint, bit-identical to a longer run at a constant learning rate)
    until the accuracy reaches ``goal`` or the run has ``limit`` rounds."""
    start = time.perf_counter()
    result = fedprompt.run(
        {**config, "federation": {**config["federation"], "rounds": budget}}, output_dir=folder
    )
    curve = result.metric("global_accuracy")
    while len(curve) - 1 < limit and max(curve[1:]) < goal:
        rounds = min(limit, len(curve) - 1 + budget)
        result = fedprompt.run(resume=result.run_dir, overrides=[f"federation.rounds={rounds}"])
        curve = result.metric("global_accuracy")
    return curve, time.perf_counter() - start


def federate(config: dict[str, Any], split: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """``config`` as a federated run: its partition and the clients' batch size and step cap."""
    config["partition"] = partition(split, clients, args.min_partition_size)
    config["optimizer"]["batch_size"] = args.federated_batch_size or args.batch_size
    config["optimizer"]["max_steps"] = args.local_steps
    return config


def federated_rounds(args: argparse.Namespace, examples: int, clients: int) -> int:
    """The federated budget in rounds: --rounds, or with --local-steps as many rounds of that many
    steps as a client holding the mean share takes in --rounds rounds of --epochs epochs (the same
    examples seen; a client with fewer examples than a batch sees fewer)."""
    if args.local_steps is None:
        return args.rounds
    batch = args.federated_batch_size or args.batch_size
    steps = args.rounds * args.epochs * math.ceil(examples / clients / batch)
    return math.ceil(steps / args.local_steps)


def rounds_to(curve: list[float], target: float) -> int | None:
    """The first round whose accuracy reaches ``target`` (None: never)."""
    return next((r for r, acc in enumerate(curve) if r > 0 and acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--tasks", default="trec,agnews,sst2")
    parser.add_argument("--clients", default="10", help="comma-separated client counts")
    parser.add_argument(
        "--partitions",
        default="dirichlet0.5",
        help="iid, dirichlet<alpha> (each class over the clients), dirichlet_per_client<alpha> "
        "(each client's class mix, equal sizes), comma-separated",
    )
    parser.add_argument(
        "--methods", default=",".join(m for m in DEFAULTS if m not in ("central", "fedavg-sgd"))
    )
    parser.add_argument("--rounds", type=int, default=3, help="the budget: rounds of --epochs local epochs")
    parser.add_argument(
        "--more-rounds", type=int, default=5, help="give every method up to this many budgets"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01, help="AdamW's learning rate (untuned runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--federated-batch-size", type=int, default=None, help="the federated runs' (default --batch-size)"
    )
    parser.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="federated clients take at most this many steps a round (optimizer.max_steps), in as many "
        "more rounds as keep the examples seen: rounds x ceil(steps per epoch of a mean client / this)",
    )
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--train-examples", type=int, default=None, help="subsample each training set")
    parser.add_argument("--test-examples", type=int, default=None, help="subsample each test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-partition-size",
        type=int,
        default=2,
        help="fewest examples a Dirichlet client may hold (1 lets SST-2's two classes split 50 ways)",
    )
    parser.add_argument("--tune", action="store_true", help="choose each setting from TRIALS first")
    parser.add_argument(
        "--settings", type=Path, default=None, help="the `chosen` settings of a --json report"
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of train held out for tuning")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="write every curve and setting here")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(DEFAULTS)}")
    loaded = json.loads(args.settings.read_text())["chosen"] if args.settings else None

    tmp = Path(tempfile.mkdtemp(prefix="skew-"))
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [], "chosen": {}}
    lines = []
    for task_name in args.tasks.split(","):
        task = TASKS[task_name]
        train, test = task.read(args.data_dir, args.seed)
        train = subsample(train, args.train_examples, args.seed)
        test = subsample(test, args.test_examples, args.seed)
        files = {
            "train": write_rows(tmp / f"{task.name}-train.jsonl", train),
            "test": write_rows(tmp / f"{task.name}-test.jsonl", test),
        }
        print(f"\n{task.name}: {len(train)} train, {len(test)} test", flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            budget_rounds = federated_rounds(args, len(train), clients)
            limit = budget_rounds * max(1, args.more_rounds)
            for split in args.partitions.split(","):
                chosen = {m: DEFAULTS[m] for m in ["central", *methods]}
                if loaded is not None:
                    chosen.update(loaded)
                if args.tune:  # what --settings gave is kept; the rest is tuned
                    missing = [m for m in ["central", *methods] if loaded is None or m not in loaded]
                    chosen.update(tune(task, train, missing, split, clients, args, tmp, chosen))
                report["chosen"] = chosen
                central_cfg = merge(base_config(task, files, args, args.rounds), chosen["central"])
                central_cfg["partition"] = partition("central", 1)
                central, seconds = grow(central_cfg, args.rounds, args.rounds, 2.0, tmp / "runs")
                target = central[-1]
                print(f"centralised {central} ({seconds:.0f} s) {json.dumps(chosen['central'])}", flush=True)
                report["runs"].append(
                    {"task": task.name, "split": "central", "curve": central, "seconds": seconds}
                )
                for name in methods:
                    cfg = federate(
                        merge(base_config(task, files, args, args.rounds), chosen[name]), split, clients, args
                    )
                    curve, seconds = grow(cfg, budget_rounds, limit, 0.98 * target, tmp / "runs")
                    budget = curve[: budget_rounds + 1]
                    row = {
                        "task": task.name,
                        "clients": clients,
                        "split": split,
                        "method": name,
                        "setting": chosen[name],
                        "central": target,
                        "curve": curve,
                        "seconds": seconds,
                        "final": budget[-1] / target,
                        "best": max(budget[1:]) / target,
                        "to_0.95": rounds_to(curve, 0.95 * target),
                        "to_0.98": rounds_to(curve, 0.98 * target),
                    }
                    report["runs"].append(row)
                    line = (
                        f"{task.name:7s} {clients:3d} {split:13s} {name:9s} central {target:.4f}  final "
                        f"{budget[-1]:.4f} ({row['final']:.3f}x)  best {max(budget[1:]):.4f} "
                        f"({row['best']:.3f}x)"
                        f"  rounds to 0.95x {row['to_0.95']}, 0.98x {row['to_0.98']} (ran {len(curve) - 1}"
                        f" of {limit})  [{seconds:.0f} s]"
                    )
                    lines.append(line)
                    print(line, json.dumps(chosen[name], separators=(",", ":")), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(report, indent=1))
    steps = f" (federated: at most {args.local_steps} local steps a round)" if args.local_steps else ""
    print(
        f"\nbudget {args.rounds} rounds x {args.epochs} epoch{steps}; 0.95x/0.98x: rounds to that share "
        "of central"
    )
    print("\n".join(lines))


def tune(
    task: Task,
    train: list[dict],
    methods: list[str],
    split: str,
    clients: int,
    args: argparse.Namespace,
    tmp: Path,
    known: dict[str, Overrides],
) -> dict[str, Overrides]:
    """Each method's best trial on a validation split of the training set, for the budget's rounds
    (the centralised baseline's on one client); ``known`` may hold FedAvg's choice already."""
    rows = list(train)
    random.Random(args.seed + 1).shuffle(rows)
    cut = int(len(rows) * args.val_fraction)
    files = {
        "train": write_rows(tmp / f"{task.name}-tune-train.jsonl", rows[cut:]),
        "test": write_rows(tmp / f"{task.name}-tune-val.jsonl", rows[:cut]),
    }
    chosen: dict[str, Overrides] = {k: v for k, v in known.items() if k == "fedavg" and k not in methods}
    for name in sorted(methods, key=lambda m: m not in ("central", "fedavg")):  # FedAvg's lr first
        scores = []
        for trial in TRIALS[name]:
            if name in SHARED_LR and "fedavg" in chosen:
                trial = merge(trial, {"optimizer": {"lr": chosen["fedavg"]["optimizer"]["lr"]}})
            cfg = merge(base_config(task, files, args, args.rounds), trial)
            if name == "central":
                cfg["partition"] = partition("central", 1)
                rounds = args.rounds
            else:
                cfg = federate(cfg, split, clients, args)
                rounds = federated_rounds(args, len(rows) - cut, clients)
            try:
                curve, seconds = grow(cfg, rounds, rounds, 2.0, tmp / "runs")
            except RuntimeError as exc:  # every client diverged (a learning rate too large)
                curve, seconds = [float("nan")], 0.0
                print(f"  tune {task.name} {name}: {json.dumps(trial)} failed: {exc}", flush=True)
            scores.append(curve[-1] if curve[-1] == curve[-1] else -1.0)
            print(
                f"  tune {task.name} {name}: {json.dumps(trial)} -> val {curve} [{seconds:.0f} s]", flush=True
            )
        best = TRIALS[name][max(range(len(scores)), key=scores.__getitem__)]
        if name in SHARED_LR and "fedavg" in chosen:
            best = merge(best, {"optimizer": {"lr": chosen["fedavg"]["optimizer"]["lr"]}})
        chosen[name] = best
    return {name: chosen[name] for name in methods}


if __name__ == "__main__":
    main()
