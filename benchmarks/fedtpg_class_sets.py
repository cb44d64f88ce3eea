"""FedTPG with per-client class sets against shared-class training, at the same budget.

Run: ``python benchmarks/fedtpg_class_sets.py`` (the tiny CLIP of tests/clip_support.py, built in
a temporary folder; nothing downloaded).

FedTPG's setting on what is offline: two datasets pooled, scikit-learn's digits (10 classes) and
the generated colour squares (4 classes), base-to-novel (the first half of each dataset's
classes trains, the second half is novel), clients cut by FedTPG's rule (``classes_per_client``
base classes of one dataset each), the generator's weights averaged uniformly. Two runs differ in
one setting only:

- ``own`` (FedTPG): each client's generator input T and softmax cover its own classes;
- ``all`` (before): every client scores all base classes of both datasets, so T is the same for
  every client and the generator never sees a class set change while it trains.

It prints base, novel and harmonic-mean accuracy (FedTPG's: the mean over datasets) per run and
seed, their means, and the ratio own / all of novel accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clip_support import build_tiny_clip, clip_run_config

from fedprompt.api import run


def config(tiny, client_classes: str, seed: int, args: argparse.Namespace) -> dict:
    digits = {"source": "builtin", "name": "digits", "test_split": None, "max_per_class": args.shots}
    colours = {"source": "image-folder", "name": str(tiny.generated), "max_per_class": args.shots}
    raw = clip_run_config(
        tiny,
        {"kind": "generator", "num_tokens": 4, "heads": 2},
        {"source": "datasets", "datasets": [digits, colours], "novel_class_fraction": 0.5},
        partition={"kind": "classes", "num_clients": 3, "classes_per_client": 2},
        federation={"rounds": args.rounds, "min_clients": 3, "evaluate_every": args.rounds},
        optimizer={
            "algorithm": "sgd",
            "lr": args.lr,
            "momentum": 0.9,
            "weight_decay": 1e-5,
            "epochs": args.epochs,
            "batch_size": 8,
        },
        strategy={"kind": "fedavg", "weighting": "uniform"},
        vision={"client_classes": client_classes},
    )
    return {**raw, "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16, help="training images per class")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        tiny = build_tiny_clip(Path(folder))
        results: dict[str, list[dict]] = {"own": [], "all": []}
        for seed in args.seeds:
            for mode in results:
                history = run(config(tiny, mode, seed, args), write=False).history
                first, last = history[0], history[-1]
                results[mode].append(last)
                print(
                    f"seed {seed} {mode:>3}: base {last['base_accuracy']:.3f}  "
                    f"novel {last['novel_accuracy']:.3f}  HM {last['harmonic_mean']:.3f}   "
                    f"(before training: base {first['base_accuracy']:.3f}, "
                    f"novel {first['novel_accuracy']:.3f})",
                    flush=True,
                )
    keys = ("base_accuracy", "novel_accuracy", "harmonic_mean")
    means = {
        mode: {key: sum(row[key] for row in rows) / len(rows) for key in keys}
        for mode, rows in results.items()
    }
    for mode, values in means.items():
        print(
            f"mean {mode:>3}: base {values['base_accuracy']:.3f}  novel {values['novel_accuracy']:.3f}  "
            f"HM {values['harmonic_mean']:.3f}"
        )
    print(f"novel accuracy own / all: {means['own']['novel_accuracy'] / means['all']['novel_accuracy']:.3f}")
    print(f"harmonic mean own / all:  {means['own']['harmonic_mean'] / means['all']['harmonic_mean']:.3f}")


if __name__ == "__main__":
    main()
