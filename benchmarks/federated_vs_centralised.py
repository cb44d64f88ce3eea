"""Federated against centralised soft-prompt tuning on SST-2 with the bundled MiniLM.

Same budget of examples seen: the centralised run is one client holding all the training data;
the federated runs split the same data among 10 clients (IID, and Dirichlet 0.5 label skew), all
sampled every round, for the same rounds and local epochs. Prints each accuracy, the ratios
federated/centralised, and the bytes each client sends per round against the backbone's size
(fp16 wire). Reads SST-2 from ../shared/data/sst2 (or --data-dir).

    python benchmarks/federated_vs_centralised.py [--train-examples 2000] [--rounds 6]
    python benchmarks/federated_vs_centralised.py --server-lr 0.03     # FedAdam on the server
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fedprompt

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def write_split(source: Path, target: Path, limit: int | None) -> str:
    lines = source.read_text().splitlines()[:limit]
    target.write_text("".join(json.dumps({"text": line[2:], "label": int(line[0])}) + "\n" for line in lines))
    return str(target)


def base_config(files: dict[str, str], args: argparse.Namespace) -> dict:
    return {
        "name": "bench-sst2",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": {
            "kind": "similarity",
            "label_descriptions": {"negative": "It was terrible.", "positive": "It was great."},
        },
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "vocab"},
        "data": {"source": "files", "files": files, "label_names": ["negative", "positive"]},
        "federation": {"rounds": args.rounds, "fraction": 1.0, "local_evaluation": False},
        "optimizer": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size},
        "payload": {"wire_dtype": "float16"},
        "runtime": {"progress": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--federated-lr",
        type=float,
        default=None,
        help="client learning rate of the federated runs (default --lr)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--federated-batch-size",
        type=int,
        default=None,
        help="batch size of the federated runs (default --batch-size)",
    )
    parser.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="federated runs use FedAdam with this server lr (default FedAvg)",
    )
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"SST-2 not found at {args.data_dir}; pass --data-dir")

    tmp = Path(tempfile.mkdtemp())
    files = {
        "train": write_split(args.data_dir / "stsa.binary.train", tmp / "train.jsonl", args.train_examples),
        "test": write_split(args.data_dir / "stsa.binary.dev", tmp / "test.jsonl", None),
    }
    runs = {
        "centralised": {"kind": "iid", "num_clients": 1, "local_val_fraction": 0.0},
        "federated-iid": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0.0},
        "federated-dirichlet0.5": {
            "kind": "dirichlet",
            "alpha": 0.5,
            "num_clients": args.clients,
            "local_val_fraction": 0.0,
        },
    }
    results = {}
    for name, partition in runs.items():
        cfg = base_config(files, args)
        cfg["partition"] = partition
        cfg["federation"]["min_clients"] = 1
        if name != "centralised":
            cfg["optimizer"]["lr"] = args.federated_lr or args.lr
            cfg["optimizer"]["batch_size"] = args.federated_batch_size or args.batch_size
            if args.server_lr is not None:
                cfg["strategy"] = {"kind": "fedadam", "server_lr": args.server_lr}
        start = time.perf_counter()
        result = fedprompt.run(cfg, write=False)
        seen = sum(r.get("examples_seen", 0) for r in result.client_history)
        results[name] = (result, time.perf_counter() - start, seen)
        print(f"{name:24s} accuracy {result.metric('global_accuracy')}  examples seen {seen:.0f}", flush=True)

    central = results["centralised"][0].metric("global_accuracy")[-1]
    print(
        f"\nSST-2 dev ({args.train_examples} training examples, {args.rounds} rounds x {args.epochs} epoch)"
    )
    print(f"{'run':24s} {'accuracy':>9s} {'/ central':>9s} {'examples':>9s} {'time s':>7s}")
    for name, (result, seconds, seen) in results.items():
        acc = result.metric("global_accuracy")[-1]
        print(f"{name:24s} {acc:9.4f} {acc / central:9.3f} {seen:9.0f} {seconds:7.1f}")
    fed = results["federated-iid"][0]
    up = fed.summary["bytes_up_per_client_round"]
    down = fed.summary["bytes_down_per_client_round"]
    print(
        f"\nbytes per client per round (fp16 wire): up {up:.0f}, down {down:.0f}; "
        f"backbone {fed.backbone_bytes:,} bytes; "
        f"up / backbone = {up / fed.backbone_bytes:.2e} (target <= 1e-4)"
    )


if __name__ == "__main__":
    main()
