"""FedPepTAO against the same deep prompt on every layer, on SST-2 or TREC with the bundled MiniLM.

Three federated runs on the same data, clients, rounds and local optimiser (AdamW), a P-tuning v2
deep prompt (key/value prefixes, `--tokens` per layer, from the model's own keys and values):

- every layer: the prefix on all 6 layers, FedAvg (the baseline);
- FedPepTAO: the prefix on the `--select` layers of highest FedPepTAO score (chosen before round 1
  from every client's scores), clients keeping their AdamW moments across rounds, the server's
  control variates and momentum (strategy.kind fedpeptao);
- selection + FedAvg: the same chosen layers with FedAvg and fresh optimisers (which part helps).

Prints each final test accuracy, the bytes each client sends per round, and the ratios against the
every-layer run. Reads ../shared/data (or --data-dir).

    python benchmarks/fedpeptao.py [--task sst2|trec] [--train-examples 2000] [--rounds 6] [--select 3]
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
TREC_DESCRIPTIONS = {
    "ABBR": "This asks for an abbreviation.",
    "DESC": "This asks for a description.",
    "ENTY": "This asks for a thing.",
    "HUM": "This asks for a person.",
    "LOC": "This asks for a place.",
    "NUM": "This asks for a number.",
}


def write_task(task: str, data_dir: Path, folder: Path, limit: int) -> tuple[dict[str, str], dict]:
    """(the files section, the head section) of a task, its splits written as JSON lines."""
    if task == "sst2":
        sources = {
            "train": data_dir / "sst2" / "stsa.binary.train",
            "test": data_dir / "sst2" / "stsa.binary.dev",
        }

        def row(line: str) -> dict:
            return {"text": line[2:], "label": int(line[0])}

        head = {
            "kind": "similarity",
            "label_descriptions": {"negative": "It was terrible.", "positive": "It was great."},
        }
        labels = ["negative", "positive"]
    else:
        sources = {"train": data_dir / "trec" / "train.txt", "test": data_dir / "trec" / "test.txt"}

        def row(line: str) -> dict:
            coarse, _, question = line.partition(" ")
            return {"text": question, "label": TREC_LABELS.index(coarse.split(":")[0])}

        head = {"kind": "similarity", "label_descriptions": TREC_DESCRIPTIONS}
        labels = TREC_LABELS
    files = {}
    for split, source in sources.items():
        lines = [line for line in source.read_text(errors="replace").splitlines() if line.strip()]
        if split == "train":
            lines = lines[:limit]
        target = folder / f"{task}-{split}.jsonl"
        target.write_text("".join(json.dumps(row(line)) + "\n" for line in lines))
        files[split] = str(target)
    return files, {**head, "_labels": labels}


def config(files: dict[str, str], head: dict, args: argparse.Namespace, **changes) -> dict:
    labels = head.pop("_labels", None) or changes.pop("labels")
    prompt = {"kind": "deep", "mode": "prefix", "num_tokens": args.tokens, "init": "vocab"}
    raw = {
        "name": "bench-fedpeptao",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": head,
        "prompt": {**prompt, **changes.pop("prompt", {})},
        "data": {"source": "files", "files": files, "label_names": labels, "test_split": "test"},
        "partition": {
            "kind": "dirichlet",
            "alpha": args.alpha,
            "num_clients": args.clients,
            "local_val_fraction": 0.0,
        },
        "federation": {"rounds": args.rounds, "fraction": args.fraction, "local_evaluation": False},
        "optimizer": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size},
        "payload": {"wire_dtype": "float16"},
        "runtime": {"progress": False},
        "output": {"plot": False},
    }
    raw.update(changes)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=["sst2", "trec"], default="sst2")
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--tokens", type=int, default=4, help="prefix slots per layer")
    parser.add_argument("--select", type=int, default=3, help="layers FedPepTAO keeps (of 6)")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        files, head = write_task(args.task, args.data_dir, Path(folder), args.train_examples)
        labels = head.pop("_labels")
        runs = {
            "every layer (FedAvg)": config(files, dict(head), args, labels=labels),
            "FedPepTAO": config(
                files,
                dict(head),
                args,
                labels=labels,
                prompt={"select_layers": args.select},
                strategy={"kind": "fedpeptao", "server_lr": args.server_lr},
            ),
            "selected layers (FedAvg)": config(
                files, dict(head), args, labels=labels, prompt={"select_layers": args.select}
            ),
        }
        results = {}
        for name, raw in runs.items():
            start = time.perf_counter()
            result = fedprompt.run(raw, write=False)
            accuracy = result.metric("global_accuracy")
            results[name] = (accuracy[-1], result.summary["bytes_up_per_client_round"])
            layers = result.summary.get("prompt_layers", "all")
            print(
                f"{name:26s} accuracy {accuracy[-1]:.4f} (by round {[round(a, 3) for a in accuracy]}), "
                f"{results[name][1]:,.0f} B up per client per round, layers {layers}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    base_accuracy, base_bytes = results["every layer (FedAvg)"]
    for name, (accuracy, up) in results.items():
        print(
            f"{name:26s} accuracy {accuracy / base_accuracy:.3f}x, "
            f"bytes {up / base_bytes:.3f}x of every layer's"
        )


if __name__ == "__main__":
    main()
