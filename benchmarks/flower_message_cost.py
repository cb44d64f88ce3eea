"""What one train message costs a site under Flower's deployment engine, with and without a site worker.

Flower 1.42 handles every message in a fresh ``flwr-clientapp`` process. This benchmark does the
same: each message is a new Python process that builds the fedprompt ClientApp and calls it with a
train message (the downlink bytes and instructions the ServerApp would send), timed from process
start to reply. Two ways, in the same run:

- alone: the ClientApp process builds the experiment itself (imports, backbone load, data
  loading and tokenisation) and trains;
- site worker: a long-lived ``fedprompt flower site-worker`` (started and warmed once, not timed)
  holds the experiment; the ClientApp process relays the bytes to it.

Prints seconds per message each way and the ratio. The job is the embedded default (soft prompt
on the bundled all-MiniLM-L6-v2, chatterbot corpus) unless ``--config`` names another.

    python benchmarks/flower_message_cost.py [--messages 3] [--config CONFIG]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# One ClientApp process: what flwr-clientapp does for a train message, minus the gRPC transport.
MESSAGE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from fedprompt.flower import build_client_app
    from fedprompt.flower.records import INSTRUCTIONS_RECORD, instructions_record
    from fedprompt.flower.records import payload_content, read_payload
    from fedprompt.federation.instructions import FitInstructions
    config_file, downlink_file, round_num, worker = sys.argv[1:5]
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    node_config = {"partition-id": 0, **({"site-worker": worker} if worker else {})}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    instructions = instructions_record(0, FitInstructions(round=int(round_num), seed=1000 + int(round_num)))
    content = payload_content(Path(downlink_file).read_bytes(), {INSTRUCTIONS_RECORD: instructions})
    reply = build_client_app(config_file)(Message(content, dst_node_id=1, message_type="train"), context)
    print(len(read_payload(reply.content, 1 << 30)))
    """
)


def downlink_bytes(config_file: Path) -> bytes:
    """The round-1 downlink the ServerApp sends client 0 (built here once, not timed)."""
    from fedprompt.config import load_config
    from fedprompt.execution.simulation import make_server
    from fedprompt.tasks.registry import build_experiment

    config = load_config(config_file)
    return make_server(build_experiment(config, client_ids=[0]), config).downlink(1, 0)


def time_messages(config_file: Path, downlink: Path, messages: int, worker: Path | None) -> list[float]:
    seconds = []
    for round_num in range(1, messages + 1):
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                MESSAGE,
                str(config_file),
                str(downlink),
                str(round_num),
                str(worker or ""),
            ],
            capture_output=True,
            text=True,
        )
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"the ClientApp process failed:\n{done.stderr[-3000:]}")
    return seconds


def start_worker(socket_path: Path, config_file: Path) -> subprocess.Popen:
    from fedprompt.flower.site_worker import SiteWorkerClient, SiteWorkerError

    fedprompt_cli = Path(sys.executable).parent / "fedprompt"
    worker = subprocess.Popen(
        [
            str(fedprompt_cli),
            "flower",
            "site-worker",
            "--socket",
            str(socket_path),
            "--config",
            str(config_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit("the site worker exited; run it by hand to see why")
        try:
            SiteWorkerClient(socket_path, timeout=5).status()
            return worker
        except SiteWorkerError:
            time.sleep(0.5)
    worker.kill()
    raise SystemExit("the site worker did not answer within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML config; the embedded default if left out"
    )
    parser.add_argument("--messages", type=int, default=3)
    args = parser.parse_args()

    from fedprompt.config import load_config
    from fedprompt.flower.app_config import CONFIG_FILE_NAME
    from fedprompt.flower.template import new_app

    with tempfile.TemporaryDirectory(prefix="fpmc") as folder:
        tmp = Path(folder)
        app = new_app(tmp / "app", args.config, ["runtime.progress=false"])
        config_file = app / CONFIG_FILE_NAME
        downlink = tmp / "downlink.safetensors"
        downlink.write_bytes(downlink_bytes(config_file))
        config = load_config(config_file)
        print(
            f"job: {config.name}, backbone {config.backbone.model}, {config.partition.num_clients} partitions"
        )

        alone = time_messages(config_file, downlink, args.messages, None)
        print(f"alone        {[round(s, 2) for s in alone]} s per message", flush=True)
        socket_path = tmp / "site.sock"
        worker = start_worker(socket_path, config_file)
        try:
            relayed = time_messages(config_file, downlink, args.messages, socket_path)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
        print(f"site worker  {[round(s, 2) for s in relayed]} s per message", flush=True)

    a, r = statistics.median(alone), statistics.median(relayed)
    print(
        f"\nmedian seconds per train message: alone {a:.2f}, with a site worker {r:.2f}; ratio {a / r:.2f}x"
    )


if __name__ == "__main__":
    main()
