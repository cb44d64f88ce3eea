"""Fed-BBPT on CLIP (a visual prompt generator trained through CLIP's logits alone) against the same
generator trained by gradient through CLIP (white-box), in one process.

Both runs train the same BlackVIP-style generator (``prompt.kind: visual-generator``: the image pooled
to ``grid`` × ``grid`` -> ``hidden`` tanh units -> a ``prompt_size``² prompt upsampled to the image and
added to its pixels) on the same clients, partition and rounds:

- Fed-BBPT: the clients reach CLIP only through ``CLIPLogitsAPI`` (prompted pixels in, class logits out,
  no graph; each image one query) and train their generators by SPSA; the server averages the
  generators, the only state that travels;
- white-box: the same generator trained by AdamW, backpropagating through CLIP.

The backbone is ``bundled:demo-clip`` (a small CLIP pre-trained offline on a tenth of scikit-learn's
digits: a demo backbone, not a real CLIP; no pretrained CLIP can be had offline) and the task the
builtin ``digits`` (scikit-learn's 1,797 handwritten digits, 10 classes; the test split leaves out the
images the backbone was pre-trained on). ``/work/shared/data`` holds no image dataset.

Prints both runs' global test accuracy by round (round 0 is the backbone zero-shot: the generator
starts at no prompt), the ratio of the final accuracies (Fed-BBPT / white-box), the queries each
client made per round and the API's own count of them.

    python benchmarks/fed_bbpt_clip.py [--rounds 6] [--budget 4800] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedprompt.config import load_config
from fedprompt.execution.simulation import run_in_process
from fedprompt.tasks.registry import build_experiment


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run both optimisers share: backbone, generator, data, partition, rounds."""
    return {
        "name": "bench-fed-bbpt-clip",
        "seed": args.seed,
        "backbone": {"kind": "open-clip", "model": "bundled:demo-clip"},
        "prompt": {
            "kind": "visual-generator",
            "grid": args.grid,
            "hidden": args.hidden,
            "prompt_size": args.prompt_size,
            "scale": 1.0,
            "class_template": "a photo of the digit {}.",
        },
        "data": {
            "source": "builtin",
            "name": "digits",
            "test_split": None,
            "test_fraction": 0.3,
            "max_per_class": args.per_class,
        },
        "partition": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0.0},
        "federation": {"rounds": args.rounds, "min_clients": args.clients, "local_evaluation": False},
        "runtime": {"device": "cpu", "progress": False, "eval_batch_size": 256},
        "output": {"plot": False},
    }


def run(raw: dict[str, Any]) -> tuple[Any, Any, float]:
    """(the run's result, its experiment, seconds) of one configuration, in this process."""
    config = load_config(raw)
    start = time.perf_counter()
    experiment = build_experiment(config)
    result = run_in_process(experiment, config)
    return result, experiment, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=40, help="training images per class (all clients)")
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--prompt-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=4800, help="SPSA queries (images) per client per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--spsa-lr", type=float, default=0.02)
    parser.add_argument("--spsa-epsilon", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.01, help="the white-box run's AdamW lr")
    parser.add_argument("--epochs", type=int, default=2, help="the white-box run's local epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    base = base_config(args)
    spsa = {
        "kind": "spsa",
        "lr": args.spsa_lr,
        "epsilon": args.spsa_epsilon,
        "budget": args.budget,
        "batch_size": args.batch_size,
    }
    gradient = {
        "kind": "gradient",
        "algorithm": "adamw",
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    blackbox, experiment, blackbox_time = run({**base, "optimizer": spsa})
    whitebox, _, whitebox_time = run({**base, "optimizer": gradient})

    fits = [r for r in blackbox.client_history if r.get("event") == "fit" and r.get("accepted")]
    queries = sorted({r["queries"] for r in fits})
    counted = experiment.model.api.queries
    a, b = blackbox.metric("global_accuracy"), whitebox.metric("global_accuracy")
    for name, curve, seconds in (
        ("Fed-BBPT (SPSA, logits only)", a, blackbox_time),
        ("white-box (AdamW through CLIP)", b, whitebox_time),
    ):
        rounds = [round(x, 3) for x in curve]
        print(f"{name:32s} accuracy {curve[-1]:.4f} (by round {rounds}), {seconds:.0f} s")
    print(f"ratio {a[-1] / b[-1]:.3f} (Fed-BBPT / white-box); zero-shot (round 0) {a[0]:.4f}")
    print(
        f"queries per client per round {queries}; the logits API counted {counted} "
        f"(the clients reported {sum(r['queries'] for r in fits):.0f})"
    )
    bytes_up = sorted({r["bytes_up"] for r in fits})
    print(f"bytes up per client per round {bytes_up} (the generator's weights, float32, and a header)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "fed_bbpt_accuracy": a,
                    "white_box_accuracy": b,
                    "ratio": a[-1] / b[-1],
                    "queries_per_client_round": queries,
                    "api_queries": counted,
                    "bytes_up_per_client_round": bytes_up,
                    "seconds": {"fed_bbpt": blackbox_time, "white_box": whitebox_time},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
