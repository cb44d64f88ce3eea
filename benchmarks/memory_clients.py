"""Peak memory of N simulated clients: one shared backbone (fedprompt in-process) vs one backbone per client.

Each measurement runs in a fresh subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The job is the embedded default (soft prompt on
the bundled all-MiniLM-L6-v2, chatterbot corpus) with ``partition.num_clients = N`` (IID), one
round in which every client trains:

- shared: fedprompt's in-process runtime, all N clients on one backbone in one process;
- per-client, one process: N experiments, each with its own backbone, each training its client
  (measured up to ``--per-client-up-to`` clients, as it loads the backbone N times);
- per-client, N workers: N x the peak of a process that hosts one client and its backbone, which is
  what a Flower simulation holds when each virtual client's worker loads its own model.

Prints the peaks and the ratios; the target is shared(32) within 1.2x of shared(1).

    python benchmarks/memory_clients.py                  # N = 1, 2, 8, 32
    python benchmarks/memory_clients.py --sizes 1,2,8,32 --per-client-up-to 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    mode, n = sys.argv[1], int(sys.argv[2])
    from fedprompt.config import load_config
    from fedprompt.tasks.experiment import build_experiment
    from fedprompt.execution.simulation import make_server, run_in_process
    after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = load_config(None, [
        f"partition.num_clients={n}", "partition.kind=iid", "federation.rounds=1",
        "federation.fraction=1.0", f"federation.min_clients={min(2, n)}",
        "federation.local_evaluation=false", "runtime.progress=false", "runtime.device=cpu",
        "optimizer.max_steps=2",
    ])
    if mode == "shared":
        run_in_process(build_experiment(config), config)
    else:  # per-client: every client holds its own experiment and backbone
        experiments = [build_experiment(config, client_ids=[cid]) for cid in range(n)]
        for cid, experiment in enumerate(experiments):
            server = make_server(experiment, config)
            experiment.clients[cid].fit_payload(
                server.downlink(1, cid), server.downlink_spec, server.instructions(1, cid),
                server.wire_dtype,
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "after_import_mib": after_import / 1024}))
    """
)


def measure(mode: str, n: int) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process running ``mode`` with ``n`` clients."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(n)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} with {n} clients failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,2,8,32", help="Client counts N, comma-separated.")
    parser.add_argument(
        "--per-client-up-to",
        type=int,
        default=8,
        help="Also measure N backbones in one process for N up to this (slow: one load per client).",
    )
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {1})

    first = measure("shared", 1)
    one = first["peak_mib"]
    print(f"python + torch + fedprompt imported: {first['after_import_mib']:.0f} MiB")
    print(f"one client with its backbone (one Flower simulation worker): {one:.0f} MiB peak\n")
    columns = ("N", "shared MiB", "vs N=1", "N backbones, 1 proc", "N workers MiB", "ratio")
    header = " ".join(f"{c:>{w}}" for c, w in zip(columns, (3, 11, 7, 20, 14, 6), strict=True))
    print(header)
    print("-" * len(header), flush=True)
    peak = one
    for n in sizes:
        peak = one if n == 1 else measure("shared", n)["peak_mib"]
        per_process = f"{measure('per-client', n)['peak_mib']:.0f}" if n <= args.per_client_up_to else "-"
        workers = n * one
        ratio = workers / peak
        print(
            f"{n:>3} {peak:>11.0f} {peak / one:>6.2f}x {per_process:>20} {workers:>14.0f} {ratio:>5.1f}x",
            flush=True,
        )
    verdict = "met" if peak / one <= 1.2 else "NOT met"
    print(f"\ntarget: {sizes[-1]} clients in-process within 1.2x of 1 client: {peak / one:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
