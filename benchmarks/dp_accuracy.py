"""Accuracy against privacy of DP-FedAvg prompt tuning: SST-2 on the bundled MiniLM, one shared
backbone for every simulated client.

For each population N (default 100 and 1,000 clients, IID over SST-2's 6,920 training sentences,
so about 69 and 7 sentences a client) the script runs the non-private FedAvg baseline and central
DP-FedAvg at each target ε (δ = 1e-5 over the whole run), all with the same rounds, the same
expected clients per round (default 100: Poisson rate q = 1.0 and 0.1 for DP; q·N clients drawn
without replacement for the baseline) and the same local work (one AdamW step of 8 sentences per
client per round by default: what two shared CPU cores allow). σ is computed
from the target ε by dp-accounting's RDP accountant; the table shows the ε each run reports. It
then measures the peak memory of a one-round private run with N clients in a fresh process against
the same run with one client (all data on it), the target being within 1.5x.

    python benchmarks/dp_accuracy.py                                  # the full table
    python benchmarks/dp_accuracy.py --populations 1000 --epsilons 8 --rounds 10   # one cell
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_DATA = (
    Path(os.environ.get("FEDPROMPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    / "sst2"
)


def write_split(source: Path, target: Path) -> str:
    lines = source.read_text().splitlines()
    target.write_text("".join(json.dumps({"text": line[2:], "label": int(line[0])}) + "\n" for line in lines))
    return str(target)


def run_config(files: dict[str, str], args: argparse.Namespace, clients: int, rate: float) -> dict:
    """The non-private run of one population; a private run adds its ``privacy`` section."""
    return {
        "name": f"dp-sst2-{clients}",
        "seed": args.seed,
        "backbone": {"model": "bundled:all-MiniLM-L6-v2", "max_length": args.max_length},
        "head": {
            "kind": "similarity",
            "label_descriptions": {"negative": "It was terrible.", "positive": "It was great."},
        },
        "prompt": {"kind": "soft", "num_tokens": args.prompt_tokens, "init": "vocab"},
        "data": {"source": "files", "files": files, "label_names": ["negative", "positive"]},
        "partition": {"kind": "iid", "num_clients": clients, "local_val_fraction": 0.0},
        "federation": {
            "rounds": args.rounds,
            "fraction": rate,
            "min_clients": 1,
            "evaluate_every": args.rounds,
            "local_evaluation": False,
        },
        "optimizer": {
            "lr": args.lr,
            "epochs": 1,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
        },
        "payload": {"wire_dtype": "float32"},
        "runtime": {"progress": False, "device": "cpu"},
    }


def private(config: dict, args: argparse.Namespace, epsilon: float) -> dict:
    return {
        **config,
        "privacy": {
            "kind": "central",
            "clip_norm": args.clip_norm,
            "target_epsilon": epsilon,
            "delta": args.delta,
            "server_momentum": args.server_momentum,
            "server_lr": args.server_lr,
        },
    }


MEMORY_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import fedprompt
    config = json.loads(sys.argv[1])
    fedprompt.run(config, write=False)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def peak_memory(config: dict) -> float:
    """Peak resident memory (MiB) of a fresh process running ``config``."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, json.dumps(config)],
        env={**os.environ},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--populations", default="100,1000", help="Client counts N, comma-separated.")
    parser.add_argument(
        "--rates", default="1.0,0.1", help="Sampling rate q of each population (expected clients = qN)."
    )
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1, help="Local steps per client per round.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=1.7,
        help="C; AdamW's first step moves every coordinate by about lr, so a client's delta has norm "
        "about lr·sqrt(d) (1.66 at the defaults): C = 1.7 clips nothing and the DP runs differ from "
        "FedAvg by the noise (and equal weights) alone.",
    )
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"SST-2 not found at {args.data_dir}; pass --data-dir")

    import torch

    import fedprompt

    torch.set_num_threads(args.threads)
    populations = [int(n) for n in args.populations.split(",")]
    rates = [float(q) for q in args.rates.split(",")]
    if len(rates) != len(populations):
        raise SystemExit("--rates needs one rate per population")
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    tmp = Path(tempfile.mkdtemp())
    files = {
        "train": write_split(args.data_dir / "stsa.binary.train", tmp / "train.jsonl"),
        "test": write_split(args.data_dir / "stsa.binary.dev", tmp / "test.jsonl"),
    }

    rows = []
    for clients, rate in zip(populations, rates, strict=True):
        base = run_config(files, args, clients, rate)
        baseline = None
        for epsilon in [None, *epsilons]:
            config = base if epsilon is None else private(base, args, epsilon)
            start = time.perf_counter()
            result = fedprompt.run(config, write=False)
            seconds = time.perf_counter() - start
            accuracy, initial = result.summary["final_accuracy"], result.summary["initial_accuracy"]
            baseline = accuracy if epsilon is None else baseline
            row = {
                "clients": clients,
                "rate": rate,
                "target_epsilon": epsilon,
                "epsilon": result.summary.get("final_epsilon"),
                "noise_multiplier": result.summary.get("noise_multiplier"),
                "accuracy": accuracy,
                "initial": initial,
                "ratio": accuracy / baseline,
                "gain_kept": (accuracy - initial) / (baseline - initial) if baseline != initial else None,
                "mean_clients": sum(r["clients_sampled"] for r in result.history[1:]) / args.rounds,
                "seconds": seconds,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(
        f"\nSST-2 dev accuracy, bundled MiniLM, soft prompt of {args.prompt_tokens} tokens; {args.rounds} "
        f"rounds, {args.steps} AdamW step(s) of batch {args.batch_size} (lr {args.lr}) per client per round; "
        f"DP: clip {args.clip_norm}, δ={args.delta:g}, Poisson sampling, server lr {args.server_lr}, "
        f"momentum {args.server_momentum}; non-private: FedAvg, qN clients a round"
    )
    header = (
        f"{'N':>5} {'q':>5} {'clients/rd':>10} {'target ε':>8} {'ε spent':>8} {'σ':>7} {'accuracy':>9} "
        f"{'/ non-DP':>8} {'gain kept':>9} {'time s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "non-DP" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        kept = "-" if r["gain_kept"] is None else f"{r['gain_kept']:.2f}"
        print(
            f"{r['clients']:>5} {r['rate']:>5g} {r['mean_clients']:>10.1f} {target:>8} {spent:>8} {sigma:>7} "
            f"{r['accuracy']:>9.4f} {r['ratio']:>8.3f} {kept:>9} {r['seconds']:>7.0f}"
        )
    print(
        f"(the initial prompt scores {rows[0]['initial']:.4f}; 'gain kept' is (accuracy − initial) / "
        "(non-private − initial), which says more than the ratio when the initial prompt is already close)"
    )
    at8 = [
        r
        for r in rows
        if epsilons and r["clients"] == max(populations) and r["target_epsilon"] == max(epsilons)
    ]
    if at8:
        verdict = "met" if at8[0]["ratio"] >= 0.9 else "NOT met"
        print(
            f"aim: at ε = {max(epsilons):g} with {max(populations)} clients >= 0.9x non-private: "
            f"{at8[0]['ratio']:.3f}x ({verdict})"
        )

    if epsilons and not args.skip_memory:
        largest, rate = max(populations), rates[populations.index(max(populations))]
        one_round = {**vars(args), "rounds": 1}
        many = private(run_config(files, argparse.Namespace(**one_round), largest, rate), args, max(epsilons))
        single = private(run_config(files, argparse.Namespace(**one_round), 1, 1.0), args, max(epsilons))
        peak_one, peak_many = peak_memory(single), peak_memory(many)
        ratio = peak_many / peak_one
        print(
            f"\npeak memory of one private round: 1 client {peak_one:.0f} MiB, {largest} clients "
            f"{peak_many:.0f} MiB: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
