"""Fed-BBPT through `fedprompt serve` against the same prompt generator trained by gradient.

Both runs train the same generator (z = W2·tanh(W1·c + b1) + b2, written into an intrinsic prompt
A z + p0 of the bundled MiniLM) on the same SST-2 clients and rounds:

- Fed-BBPT: the MiniLM is behind the inference service on loopback (the `fedprompt serve` app in a
  thread: the clients send token ids and z, get losses back, never see a weight); each client trains
  its generator by SPSA, the server averages the generators;
- gradient: the same generator on a MiniLM in this process, trained by AdamW.

Prints both test accuracies, their ratio (aim: Fed-BBPT ≥ 0.9× the gradient-trained generator), the
queries each client made per round and the service's own count. Reads ../shared/data (or --data-dir).

    python benchmarks/fed_bbpt.py [--rounds 5] [--budget 2560]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpeptao import SHARED, write_task  # the same data files

import fedprompt
from fedprompt.config import load_config
from fedprompt.serving import InferenceService, create_app, serve_in_thread
from fedprompt.tasks.text.parts import load_backbone

TOKEN = "benchmark-token-0123456789abcdef"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--per-class", type=int, default=100, help="training sentences per class")
    parser.add_argument("--test-examples", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=2560, help="SPSA queries per client per round")
    parser.add_argument("--spsa-lr", type=float, default=0.2)
    parser.add_argument("--spsa-epsilon", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.003, help="the gradient run's AdamW lr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        files, head = write_task("sst2", args.data_dir, Path(folder), None)
        labels = head.pop("_labels")
        base = {
            "name": "bench-fed-bbpt",
            "seed": args.seed,
            "backbone": {"kind": "hf-text", "model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
            "head": head,
            "prompt": {
                "kind": "intrinsic",
                "dim": 500,
                "num_tokens": 5,
                "generator": {"code_dim": 16, "hidden": 32},
            },
            "data": {
                "source": "files",
                "files": files,
                "label_names": labels,
                "test_split": "test",
                "max_per_class": args.per_class,
                "max_test_examples": args.test_examples,
            },
            "partition": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0.0},
            "federation": {"rounds": args.rounds, "min_clients": 2, "local_evaluation": False},
            "runtime": {"progress": False},
            "output": {"plot": False},
        }
        spsa = {
            "kind": "spsa",
            "lr": args.spsa_lr,
            "epsilon": args.spsa_epsilon,
            "budget": args.budget,
            "batch_size": 32,
        }
        gradient = {"kind": "gradient", "algorithm": "adamw", "lr": args.lr, "epochs": 1, "batch_size": 16}
        cfg = load_config({**base, "optimizer": spsa})
        service = InferenceService(
            load_backbone(cfg.backbone, cfg.head.kind, cfg.seed), "bundled:all-MiniLM-L6-v2"
        )
        os.environ["FEDPROMPT_API_TOKEN"] = TOKEN
        start = time.perf_counter()
        with serve_in_thread(create_app(service, {"bench": TOKEN})) as url:
            remote = fedprompt.run(
                {**base, "backbone": {"kind": "remote", "url": url}, "optimizer": spsa}, write=False
            )
        remote_time = time.perf_counter() - start
        start = time.perf_counter()
        local = fedprompt.run({**base, "optimizer": gradient}, write=False)
        local_time = time.perf_counter() - start
    fits = [r for r in remote.client_history if r.get("event") == "fit" and r.get("accepted")]
    queries = sorted({r["queries"] for r in fits})
    a, b = remote.metric("global_accuracy"), local.metric("global_accuracy")
    for name, curve, seconds in (
        ("Fed-BBPT (SPSA, served)", a, remote_time),
        ("gradient (local)", b, local_time),
    ):
        rounds = [round(x, 3) for x in curve]
        print(f"{name:24s} accuracy {curve[-1]:.4f} (by round {rounds}), {seconds:.0f} s")
    print(f"ratio {a[-1] / b[-1]:.3f} (aim >= 0.9)")
    print(
        f"queries per client per round {queries}; the service counted {service.usage('bench').queries} "
        f"(clients' {sum(r['queries'] for r in fits):.0f} + the server's evaluations)"
    )


if __name__ == "__main__":
    main()
