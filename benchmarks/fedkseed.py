"""FedKSeed against SPSA on the full prompt: bytes per client per round, and accuracy at the same
number of model queries.

Both runs train the same 8 × 384 soft prompt on the bundled all-MiniLM-L6-v2 (similarity head),
same SST-2 subset, clients, rounds, SPSA settings (η, ε, batch, steps), so the same model queries:

- baseline: SPSA (MeZO, in place) on the prompt, FedAvg of the clients' prompts; each client
  sends its whole prompt up and gets the global one down;
- FedKSeed: the same steps, each along one of K pooled seeds; each client sends its (seed index,
  ĝ) pairs up (8 bytes a step), the server replays them; downlink the global prompt. The bytes a
  seed-pool downlink (the paper's: K accumulated ĝ) would send are measured on the same server.

Prints bytes up/down per client per round for both, the accuracies and their ratio.

    python benchmarks/fedkseed.py              # SST-2 from $FEDPROMPT_SHARED_DATA/sst2 (35 min)
    python benchmarks/fedkseed.py --quick      # a smoke run of the whole script
    python benchmarks/fedkseed.py --data none  # the embedded default chat task instead of SST-2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fedprompt
from fedprompt.config import load_config
from fedprompt.execution.results import RunResult
from fedprompt.execution.simulation import make_server
from fedprompt.tasks.registry import build_experiment

LABELS = ("negative", "positive")
SHARED_DATA = Path(
    os.environ.get("FEDPROMPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
DEFAULT_DATA = SHARED_DATA / "sst2"


def sst2_jsonl(source: Path, name: str, out: Path) -> Path:
    """One SST-2 file (``LABEL SENTENCE`` lines) as jsonl with text and a label name."""
    with out.open("w") as handle:
        for line in (source / name).read_text().splitlines():
            label, _, text = line.partition(" ")
            handle.write(json.dumps({"text": text, "label": LABELS[int(label)]}) + "\n")
    return out


def data_section(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    if args.data == "none":  # the embedded default: 21 chat topics, held-out fraction as test set
        return {"source": "builtin", "name": "chatterbot-corpus", "test_split": None, "test_fraction": 0.2}
    source = Path(args.data)
    return {
        "source": "files",
        "files": {
            "train": str(sst2_jsonl(source, "stsa.binary.train", folder / "train.jsonl")),
            "test": str(sst2_jsonl(source, "stsa.binary.dev", folder / "test.jsonl")),
        },
        "max_per_class": args.train_per_class,
        "max_test_examples": args.test_examples,
    }


def config(args: argparse.Namespace, data: dict[str, Any], strategy: dict[str, Any]) -> dict[str, Any]:
    head = (
        {
            "kind": "similarity",
            "label_descriptions": {"negative": "A bad movie.", "positive": "A good movie."},
        }
        if args.data != "none"
        else {"kind": "similarity", "template": "{text}", "description_template": "This is about {label}."}
    )
    return {
        "name": f"spsa-{strategy['kind']}",
        "seed": args.seed,
        "backbone": {"kind": "hf-text", "model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": head,
        "prompt": {"kind": "soft", "num_tokens": 8, "init": "vocab"},
        "data": data,
        "partition": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0},
        "federation": {
            "rounds": args.rounds,
            "min_clients": args.clients,
            "evaluate_every": args.rounds,  # the initial and the final prompt only: evaluation is costly
            "local_evaluation": False,
        },
        "optimizer": {
            "kind": "spsa",
            "lr": args.lr,
            "epsilon": args.epsilon,
            "budget": 2 * args.batch_size * args.steps,
            "batch_size": args.batch_size,
        },
        "strategy": strategy,
        "payload": {"wire_dtype": "float32"},
        "runtime": {"progress": False},
    }


def run(raw: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    result: RunResult = fedprompt.run(raw, write=False)
    rows = [row for row in result.client_history if row.get("event") == "fit" and row["accepted"]]
    return {
        "accuracy": result.metric("global_accuracy"),
        "final_accuracy": result.summary["final_accuracy"],
        "queries_total": int(sum(row["queries"] for row in rows)),
        "bytes_up_per_client_round": statistics.fmean(row["bytes_up"] for row in rows),
        "bytes_down_per_client_round": statistics.fmean(row["bytes_down"] for row in rows),
        "seconds": time.perf_counter() - start,
    }


def seed_pool_downlink_bytes(raw: dict[str, Any]) -> int:
    """Bytes of one client's round-1 downlink with ``strategy.downlink: seed-pool`` (K float32 and a
    header, whatever the prompt)."""
    settings = load_config({**raw, "strategy": {**raw["strategy"], "downlink": "seed-pool"}})
    server = make_server(build_experiment(settings, client_ids=[0]), settings, client_ids=[0])
    return len(server.downlink(1, 0))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="SST-2 folder, or 'none' for the default task"
    )
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="SPSA steps per client per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--epsilon", type=float, default=5e-4, help="the FedKSeed paper's ε")
    parser.add_argument("--num-seeds", type=int, default=4096, help="K, the FedKSeed paper's 4096")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 clients, 2 rounds of 4 steps: a smoke run")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.steps, args.train_per_class, args.test_examples = 2, 2, 4, 16, 32
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = data_section(args, Path(tmp))
        baseline_raw = config(args, data, {"kind": "fedavg"})
        kseed_raw = config(args, data, {"kind": "fedkseed", "num_seeds": args.num_seeds})
        baseline = run(baseline_raw)
        kseed = run(kseed_raw)
        pool_down = seed_pool_downlink_bytes(kseed_raw)

    task = "the default chat task" if args.data == "none" else f"SST-2 ({args.train_per_class}/class train)"
    print(
        f"{task}; MiniLM, soft prompt 8 x 384; {args.clients} clients x {args.rounds} rounds x {args.steps} "
        f"SPSA steps of batch {args.batch_size} (lr {args.lr:g}, eps {args.epsilon:g}); K = {args.num_seeds}"
    )
    print(f"{'':28}{'bytes up':>10}{'bytes down':>12}{'queries':>10}{'accuracy':>10}")
    for name, numbers in (("SPSA full prompt, FedAvg", baseline), ("FedKSeed", kseed)):
        print(
            f"{name:28}{numbers['bytes_up_per_client_round']:>10.0f}{numbers['bytes_down_per_client_round']:>12.0f}"
            f"{numbers['queries_total']:>10}{numbers['final_accuracy']:>10.4f}"
        )
    print(f"{'FedKSeed, seed-pool down':28}{'':>10}{pool_down:>12}")
    ratio = kseed["final_accuracy"] / baseline["final_accuracy"]
    initial = baseline["accuracy"][0]
    gain = (kseed["final_accuracy"] - initial) / (baseline["final_accuracy"] - initial or float("nan"))
    up, full_up = kseed["bytes_up_per_client_round"], baseline["bytes_up_per_client_round"]
    print(
        f"uplink: {up:.0f} B per client per round (target <= 1024), {full_up / up:.1f}x less than the prompt"
    )
    print(
        f"accuracy ratio FedKSeed / SPSA-FedAvg: {ratio:.3f} (target >= 0.9); same queries: "
        f"{kseed['queries_total'] == baseline['queries_total']}"
    )
    print(f"initial accuracy {initial:.4f}; gain over it, FedKSeed / SPSA-FedAvg: {gain:.3f}")
    print(
        "accuracy by round:",
        [round(a, 4) for a in baseline["accuracy"]],
        [round(a, 4) for a in kseed["accuracy"]],
    )
    if args.json:
        numbers = {
            "baseline": baseline,
            "fedkseed": kseed,
            "seed_pool_bytes_down": pool_down,
            "ratio": ratio,
            "gain_ratio": gain,
        }
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **numbers}, indent=2))


if __name__ == "__main__":
    main()
