"""Black-box federated prompt tuning (FedBPT: CMA-ES clients) against gradient federated prompt tuning.

Same backbone (bundled all-MiniLM-L6-v2, similarity head), same SST-2 subset, same clients and
partition, run in this process one after the other. Prints, with ratios against the gradient run:
final test accuracy, model queries used, bytes per client per round (up and down; the intrinsic
prompt's d floats against the soft prompt's m·h floats and the reference FedBPT's pickled CMA-ES),
and the cost of population evaluation with and without the once-per-generation reuse.

    python benchmarks/blackbox_vs_gradient.py                    # about 20-30 minutes on 2 CPU cores
    python benchmarks/blackbox_vs_gradient.py --quick            # a smoke run of the whole script
    python benchmarks/blackbox_vs_gradient.py --json out.json    # also write every number
    python benchmarks/blackbox_vs_gradient.py --remote --num-tokens 50 --skip-timing
        # BBT's reference shape (50 tokens, d = 500), the black-box clients querying the model
        # through `fedprompt serve`'s app on loopback HTTP, each client with its own token: the
        # service's per-client queries and bytes per round beside the federation's bytes

SST-2 is read from ../shared/data/sst2 (``LABEL SENTENCE`` lines; --data to point elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fedprompt
from fedprompt.execution.results import RunResult
from fedprompt.execution.simulation import run_in_process
from fedprompt.serving import InferenceService, create_app, serve_in_thread
from fedprompt.tasks.registry import build_experiment
from fedprompt.tasks.text.parts import load_backbone
from fedprompt.tasks.text.remote import build_remote_model

LABELS = ("negative", "positive")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
REFERENCE_PICKLE_BYTES_D500 = 4_198_952
"""``len(pickle.dumps(es))`` of pycma 4.5's CMAEvolutionStrategy at d = 500 after one generation,
measured once: what NVFlare's FedBPT sends every client every round (C and its eigenbasis B,
2·d²·8 bytes, dominate). Not recomputed here, so this script never touches pickle."""


def sst2_jsonl(source: Path, name: str, out: Path) -> Path:
    """One SST-2 file (``LABEL SENTENCE`` lines) as jsonl with text and a label name."""
    with out.open("w") as handle:
        for line in (source / name).read_text().splitlines():
            label, _, text = line.partition(" ")
            handle.write(json.dumps({"text": text, "label": LABELS[int(label)]}) + "\n")
    return out


def base_config(args: argparse.Namespace, train: Path, test: Path) -> dict[str, Any]:
    """What both runs share: backbone, head, data, clients, rounds, evaluation."""
    return {
        "seed": args.seed,
        "backbone": {"kind": "hf-text", "model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "head": {
            "kind": "similarity",
            "label_descriptions": {"negative": "A bad movie.", "positive": "A good movie."},
        },
        "data": {
            "source": "files",
            "files": {"train": str(train), "test": str(test)},
            "max_per_class": args.train_per_class,
            "max_test_examples": args.test_examples,
        },
        "partition": {"kind": "iid", "num_clients": args.clients, "local_val_fraction": 0},
        "federation": {"rounds": args.rounds, "min_clients": args.clients, "local_evaluation": False},
        "runtime": {"progress": False},
    }


def gradient_config(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    return {
        **base,
        "name": "gradient-soft-prompt",
        "prompt": {"kind": "soft", "num_tokens": args.num_tokens, "init": "vocab"},
        "optimizer": {"kind": "gradient", "algorithm": "adamw", "lr": args.lr, "epochs": 1, "batch_size": 16},
        "strategy": {"kind": "fedavg"},
    }


def blackbox_config(args: argparse.Namespace, base: dict[str, Any], rule: str) -> dict[str, Any]:
    length = (
        {"generations": args.generations, "score_on": "local-set"}
        if args.score_on == "local-set"
        else {"budget": args.popsize * args.cma_batch * args.generations}
    )
    return {
        **base,
        "name": f"fedbpt-{rule}",
        "prompt": {"kind": "intrinsic", "dim": args.dim, "num_tokens": args.num_tokens},
        "optimizer": {
            "kind": "cmaes",
            "popsize": args.popsize,
            "sigma": 1.0,
            **length,
            "batch_size": args.cma_batch,
            "chunk_size": args.chunk_size,
        },
        "strategy": {"kind": "fedbpt", "rule": rule, "sigma_floor": 0.5, "sigma_decay": args.sigma_decay},
        "federation": {**base["federation"], **acceptance(args)},
    }


def acceptance(args: argparse.Namespace) -> dict[str, Any]:
    """The black-box runs' held-out acceptance test (``--acceptance-per-class``), or nothing."""
    if not args.acceptance_per_class:
        return {}
    return {"acceptance": {"held_out_per_class": args.acceptance_per_class, "score": args.acceptance_score}}


def run(config: dict[str, Any]) -> tuple[RunResult, float]:
    start = time.perf_counter()
    result = fedprompt.run(config, write=False)
    return result, time.perf_counter() - start


TOKEN_ENV = "FEDPROMPT_BENCHMARK_TOKEN"


def run_remote(config: dict[str, Any]) -> tuple[RunResult, float, dict[str, Any]]:
    """The black-box run with its backbone behind the inference service on loopback HTTP: the
    server's evaluation and each client query it with tokens of their own (``server``, ``site-N``),
    so the service counts each client's queries and bytes apart (each waiting up to an hour for an
    answer: a loaded 2-core machine can take minutes for one population). Returns the run, its
    seconds and the service's usage by token."""
    local = fedprompt.load_config(config)
    backbone = load_backbone(local.backbone, local.head.kind, local.seed)
    service = InferenceService(backbone, local.backbone.model)
    names = ["server", *(f"site-{cid}" for cid in range(local.partition.num_clients))]
    tokens = {name: secrets.token_hex(16) for name in names}
    start = time.perf_counter()
    with serve_in_thread(create_app(service, tokens)) as url:
        cfg = fedprompt.load_config(
            {**config, "backbone": {"kind": "remote", "url": url, "token_env": TOKEN_ENV, "timeout": 3600}}
        )
        try:
            os.environ[TOKEN_ENV] = tokens["server"]
            experiment = build_experiment(cfg)
            for cid, client in experiment.clients.items():
                os.environ[TOKEN_ENV] = tokens[f"site-{cid}"]
                client.model, _ = build_remote_model(cfg, cfg.backbone, experiment.label_names)
        finally:
            del os.environ[TOKEN_ENV]
        result = run_in_process(experiment, cfg)
    seconds = time.perf_counter() - start
    return result, seconds, {name: usage.model_dump() for name, usage in service.all_usage().items()}


def service_costs(usage: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Per client per round: the queries and the request and answer bytes the service counted."""
    sites = {name: u for name, u in usage.items() if name.startswith("site-")}
    per_round = {
        name: {
            "queries": u["queries"] / rounds,
            "requests": u["requests"] / rounds,
            "bytes_up": u["bytes_received"] / rounds,
            "bytes_down": u["bytes_sent"] / rounds,
        }
        for name, u in sites.items()
    }
    return {"per_client_round": per_round, "server_evaluation": usage.get("server")}


def summary(result: RunResult, seconds: float) -> dict[str, Any]:
    rows = [row for row in result.client_history if row.get("event") == "fit" and row["accepted"]]
    # black-box: model queries (one candidate on one example, forward only); gradient: examples seen
    # (each a forward and a backward pass)
    queries = [row["queries"] or row["examples_seen"] for row in rows]
    s = result.summary
    return {
        "accuracy": result.metric("global_accuracy"),
        "final_accuracy": s["final_accuracy"],
        "queries_total": sum(queries),
        "queries_per_client_round": statistics.fmean(queries),
        "bytes_up_per_client_round": s["bytes_up_per_client_round"],
        "bytes_down_per_client_round": s["bytes_down_per_client_round"],
        "prompt_floats": sum(t.numel() for t in result.final_state.values()),
        "seconds": seconds,
    }


def population_timing(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, float]:
    """Seconds to score P candidates on one batch: per candidate through the module's forward
    (tokenising and embedding every time, as a client that sends raw texts per query would make a
    server do; or embedding every time on pre-tokenised inputs), against one population call
    (inputs embedded once per generation, candidates run ``chunk`` at a time)."""
    experiment = build_experiment(fedprompt.load_config(config))
    model = experiment.model
    client = next(iter(experiment.clients.values()))
    texts_batch = next(client.train_data.batches(args.cma_batch))
    texts = model.backbone.tokenizer.batch_decode(texts_batch["input_ids"], skip_special_tokens=True)
    candidates = torch.randn(args.popsize, args.dim, generator=torch.Generator().manual_seed(0))

    def per_candidate(tokenise: bool) -> None:
        for z in candidates:
            model.load_state_dict({"prompt.z": z})
            with torch.inference_mode():
                model(model.encode_texts(texts) if tokenise else texts_batch)

    timings = {
        "per candidate, tokenised each time": lambda: per_candidate(True),
        "per candidate, embedded each time": lambda: per_candidate(False),
    }
    for chunk in sorted({1, 2, 5, args.popsize}):
        if chunk <= args.popsize:
            timings[f"population call, chunk {chunk}"] = lambda c=chunk: _population(
                model, candidates, texts_batch, c
            )
    out = {}
    previous = torch.get_num_threads()
    for threads in args.timing_threads:
        torch.set_num_threads(threads)
        for name, fn in timings.items():
            fn()  # warm-up
            samples = []
            for _ in range(args.timing_repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            out[f"{name} [{threads} thread{'s' if threads > 1 else ''}]"] = statistics.median(samples)
    torch.set_num_threads(previous)
    return out


def _population(model: Any, candidates: torch.Tensor, batch: dict[str, torch.Tensor], chunk: int) -> None:
    previous, model.chunk_size = model.chunk_size, chunk
    try:
        model.population_logits(candidates, batch)
    finally:
        model.chunk_size = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--train-per-class", type=int, default=200, help="FedBPT's reference: 200 shots per class"
    )
    parser.add_argument("--test-examples", type=int, default=400, help="from the SST-2 dev split")
    parser.add_argument("--num-tokens", type=int, default=5, help="m, prompt vectors (both methods)")
    parser.add_argument("--dim", type=int, default=500, help="d, the intrinsic dimension")
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--cma-batch", type=int, default=32, help="examples per CMA-ES generation")
    parser.add_argument("--generations", type=int, default=3, help="local CMA-ES generations per round")
    parser.add_argument(
        "--score-on",
        choices=["batch", "local-set"],
        default="batch",
        help="batch: each generation scores --cma-batch fresh examples; local-set: FedBPT's reference, "
        "every generation on the whole local set (--cma-batch then only splits forward passes)",
    )
    parser.add_argument(
        "--sigma-decay", type=float, default=1.0, help="FedBPT's σ schedule: σ sent down × this each round"
    )
    parser.add_argument(
        "--acceptance-per-class",
        type=int,
        default=0,
        help="black-box runs: training examples per class the server keeps back to accept a new global z "
        "only when its held-out score is no worse (0: accept every round, the reference's)",
    )
    parser.add_argument("--acceptance-score", choices=["loss", "accuracy"], default="loss")
    parser.add_argument("--chunk-size", type=int, default=1, help="candidates per forward pass")
    parser.add_argument("--lr", type=float, default=0.01, help="gradient run's AdamW learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's)")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument(
        "--timing-threads",
        type=lambda text: [int(t) for t in text.split(",")],
        default=[1, 2],
        help="intra-op thread counts to time population evaluation at, e.g. 1,2",
    )
    parser.add_argument("--with-mean-rule", action="store_true", help="also run FedBPT's plain-mean rule")
    parser.add_argument(
        "--remote", action="store_true", help="black-box runs query the model through the HTTP service"
    )
    parser.add_argument("--skip-timing", action="store_true", help="leave out the population timing")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the methods")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.train_per_class, args.test_examples = 2, 1, 16, 32
        args.popsize, args.cma_batch, args.generations, args.timing_repeats = 4, 8, 1, 1
    if not (args.data / "stsa.binary.train").is_file():
        raise SystemExit(f"SST-2 not found in {args.data} (expected stsa.binary.train/.dev); pass --data")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        train = sst2_jsonl(args.data, "stsa.binary.train", Path(tmp) / "train.jsonl")
        test = sst2_jsonl(args.data, "stsa.binary.dev", Path(tmp) / "dev.jsonl")
        base = base_config(args, train, test)
        configs = {"gradient": gradient_config(args, base), "fedbpt": blackbox_config(args, base, "cma")}
        if args.with_mean_rule:
            configs["fedbpt-mean"] = blackbox_config(args, base, "mean")
        results = {}
        for name, config in configs.items():
            print(f"running {name}{' through the service' if args.remote and name != 'gradient' else ''} ...")
            if args.remote and name != "gradient":
                result, seconds, usage = run_remote(config)
                results[name] = {**summary(result, seconds), "service": service_costs(usage, args.rounds)}
            else:
                results[name] = summary(*run(config))
            print(f"  accuracy by round: {[round(a, 4) for a in results[name]['accuracy']]}", flush=True)
        timing = {} if args.skip_timing else population_timing(args, configs["fedbpt"])
    report(args, results, timing)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": results,
                    "population_seconds": timing,
                },
                indent=2,
            )
        )


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], timing: dict[str, float]) -> None:
    grad = results["gradient"]
    print(
        f"\nSST-2, all-MiniLM-L6-v2, {args.clients} clients (iid), {args.rounds} rounds, "
        f"{2 * args.train_per_class} training and {args.test_examples} test examples, "
        f"torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'run':<14}{'final acc':>10}{'/ grad':>8}{'queries':>12}{'q/client/rnd':>14}{'B up/cl/rnd':>13}"
        f"{'B down/cl/rnd':>15}{'seconds':>9}"
    )
    print(header)
    for name, r in results.items():
        print(
            f"{name:<14}{r['final_accuracy']:>10.4f}{r['final_accuracy'] / grad['final_accuracy']:>8.3f}"
            f"{r['queries_total']:>12.0f}{r['queries_per_client_round']:>14.0f}{r['bytes_up_per_client_round']:>13.0f}"
            f"{r['bytes_down_per_client_round']:>15.0f}{r['seconds']:>9.0f}"
        )
    bb = results["fedbpt"]
    print(
        f"\nblack-box accuracy / gradient accuracy: {bb['final_accuracy'] / grad['final_accuracy']:.3f} "
        "(aim: >= 0.95)"
    )
    print(
        f"bytes down per client per round at d = {args.dim}: {bb['bytes_down_per_client_round']:.0f} "
        f"(aim: < 4096; {bb['prompt_floats']} floats of z + σ + header)"
    )
    down, up = bb["bytes_down_per_client_round"], bb["bytes_up_per_client_round"]
    print(
        f"  vs the soft prompt's down: {down / grad['bytes_down_per_client_round']:.3f}× "
        f"({grad['prompt_floats']} floats); vs the reference's pickled CMA-ES at d = 500 "
        f"({REFERENCE_PICKLE_BYTES_D500:,} bytes): {down / REFERENCE_PICKLE_BYTES_D500:.5f}×"
    )
    print(f"  bytes up: {up / grad['bytes_up_per_client_round']:.3f}× the soft prompt's")
    print(
        f"model use: black-box {bb['queries_total']:.0f} (forward passes of one example, no backward) vs "
        f"gradient {grad['queries_total']:.0f} (examples seen, each a forward and a backward pass)"
    )
    if "service" in bb:
        print("through the service (loopback HTTP), per client per round, as the service counted them:")
        for name, cost in bb["service"]["per_client_round"].items():
            print(
                f"  {name}: {cost['queries']:.0f} queries in {cost['requests']:.1f} requests, "
                f"{cost['bytes_up']:.0f} B up, {cost['bytes_down']:.0f} B down"
            )
        evaluation = bb["service"]["server_evaluation"]
        print(f"  server's global evaluation: {evaluation['queries']} queries over the run")
    if not timing:
        return
    print(
        f"\npopulation evaluation of {args.popsize} candidates on {args.cma_batch} examples (median seconds):"
    )
    for name, seconds in timing.items():
        threads = name[name.index("[") :]
        base = timing[f"per candidate, embedded each time {threads}"]
        print(f"  {name:<50}{seconds:>8.3f}  speed-up vs per-candidate embedding: {base / seconds:.2f}×")


if __name__ == "__main__":
    main()
