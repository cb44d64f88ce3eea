"""FeS's co-planner (``pseudo_labels.co_planning``) on the Flower runtime.

A planned few-shot job through the ServerApp/ClientApp exchange gives the in-process run bit for
bit (global prompt, server rows, every client's plan in every round), and the planner's records,
client state that never leaves the site, survive a stop of the run and a restart of the sites
where sites keep client state that outlives a Flower run (a SuperNode's ``client-state-dir``, a
site worker's ``--state-dir``). The grid has two candidates, so rounds 1 and 2 profile them and
round 3 chooses by the gains per cost the records hold: a site that lost its records plans
otherwise, and the tests show it.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from flower_support import (
    InMemoryGrid,
    assert_same_history,
    client_app_nodes,
    tiny_config,
    write_app,
    write_dataset,
)
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

import fedprompt
from fedprompt.config import load_config
from fedprompt.execution.results import RunResult
from fedprompt.flower import run_server
from fedprompt.flower.app_config import AppSettings
from fedprompt.flower.client_app import build_client_app
from fedprompt.flower.records import read_instructions
from fedprompt.flower.site import CLIENT_STATE_RESET
from fedprompt.flower.site_worker import SiteWorker
from fedprompt.training.co_planning import Plan, candidates
from fedprompt.training.config import CoPlanningConfig

pytestmark = pytest.mark.slow

DEEP = {"kind": "deep", "mode": "prefix", "num_tokens": 4, "init": "random", "init_std": 0.9}
GRID = {"depths": [1, 2], "capacities": [0.3]}
STATE_SITES = (0, 1)
"""Partitions whose SuperNode keeps client state in its ``client-state-dir``."""
WORKER_SITE = 2
"""The partition whose SuperNode relays to a site worker (``--state-dir``)."""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has set before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def planned_job(tmp_path_factory) -> tuple[Path, RunResult]:
    """(the Flower app of a three-round FeS job with the co-planner, its in-process run).

    Three few-shot clients (3 labels per class, the rest unlabelled), all sampled every round,
    FedAvg, local evaluation on (so the sites also evaluate with the records they carry). With
    seed 1 the third round's choices differ between clients: the test sees the planner both keep
    and leave a candidate."""
    folder = tmp_path_factory.mktemp("planned")
    config = tiny_config(
        write_dataset(folder / "data.jsonl"),
        num_clients=3,
        rounds=3,
        prompt=DEEP,
        data={"labelled_per_class": 3},
        strategy={"kind": "fedavg"},
        federation={"local_evaluation": True},
    )
    config["seed"] = 1
    config["pseudo_labels"] = {"co_planning": GRID}
    app = write_app(folder / "app", config)
    return app, fedprompt.run(load_config(app / "fedprompt.yaml"), write=False)


def assert_same_run(got: RunResult, want: RunResult) -> None:
    """The same final global state bit for bit, the same server rows (but wall-clock time) and the
    same client rows: every fit's plan_* numbers and every evaluation, per client per round."""
    assert sorted(got.final_state) == sorted(want.final_state)
    for name, tensor in want.final_state.items():
        assert torch.equal(got.final_state[name], tensor), name
    assert_same_history(got.history, want.history)
    assert got.client_history == want.client_history


def fits(result: RunResult) -> dict[int, list[dict]]:
    """Client id -> its fit rows, by round."""
    rows: dict[int, list[dict]] = {}
    for row in sorted(result.client_history, key=lambda r: (r["client_id"], r["round"])):
        if row["event"] == "fit":
            rows.setdefault(row["client_id"], []).append(row)
    return rows


def check_plans(rows: list[dict]) -> Plan:
    """Check one client's plans in rounds 1-3 against its records, computed by hand from its
    reported numbers, and return its round-3 plan. Rounds 1 and 2 profile the two candidates in grid
    order; a round reports as its gain its score less the previous round's; round 3 takes the
    candidate with the highest gain per cost (the gain reported a round later over the cost
    reported with it)."""
    grid = candidates(CoPlanningConfig(**GRID))
    assert [r["round"] for r in rows] == [1, 2, 3]
    plans = [grid.index(Plan(int(r["plan_depth"]), r["plan_capacity"])) for r in rows]
    assert plans[:2] == [0, 1]
    assert "plan_gain" not in rows[0]
    for before, after in itertools.pairwise(rows):
        assert after["plan_gain"] == after["plan_score"] - before["plan_score"]
    ratios = [rows[1]["plan_gain"] / rows[0]["plan_cost"], rows[2]["plan_gain"] / rows[1]["plan_cost"]]
    assert plans[2] == max(range(2), key=lambda i: (ratios[i], -i)), ratios
    return grid[plans[2]]


@contextmanager
def site_worker(socket_path: Path, state_dir: Path) -> Iterator[SiteWorker]:
    """A site worker serving from a thread of this process until the block ends (a worker process
    that stops with it: its memory goes, its ``state_dir`` stays)."""
    worker = SiteWorker(socket_path, state_dir)
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.shutdown()
        thread.join(timeout=30)


def test_a_planned_fes_job_on_flower_gives_the_in_process_run_plans_included(planned_job):
    app, expected = planned_job
    client_app = build_client_app(app / "fedprompt.yaml")
    grid = InMemoryGrid(client_app_nodes(client_app, range(3), {}))  # records in each node's context
    with tempfile.TemporaryDirectory() as runs:
        result = run_server(grid, load_config(app / "fedprompt.yaml"), AppSettings(results_dir=Path(runs)))
        checkpoint = load_file(result.run_dir / "checkpoint.safetensors")
    assert not [key for key in checkpoint if "co_plan" in key]  # the records never reach the server

    assert_same_run(result, expected)
    third = {cid: check_plans(rows) for cid, rows in fits(result).items()}
    assert {plan.depth for plan in third.values()} == {1, 2}, (
        "the job no longer shows a round-3 choice that keeps and one that leaves a candidate; pick "
        f"another seed for planned_job ({third})"
    )
    assert not any(CLIENT_STATE_RESET in row for row in result.client_history)


def test_the_planners_records_survive_a_stop_and_a_restart_of_the_sites(planned_job, tmp_path):
    """Two rounds, a stop, then new SuperNodes (new Flower contexts, as a resumed run is a new Flower
    run) and a new site worker on the same folders resume to round 3: exactly the straight run.
    The same resume from sites whose folders are empty starts every client's planner afresh: round
    3 profiles candidate 0 again, the sites say they reset, and the global prompt differs."""
    app, expected = planned_job
    client_app = build_client_app(app / "fedprompt.yaml")

    def sites(folder: Path, socket_path: Path) -> InMemoryGrid:
        kept = {p: {"client-state-dir": str(folder / f"site-{p}")} for p in STATE_SITES}
        nodes = client_app_nodes(client_app, STATE_SITES, {}, partition_configs=kept)
        relayed = client_app_nodes(
            client_app, [WORKER_SITE], {}, {"site-worker": str(socket_path)}, first_node=2001
        )
        return InMemoryGrid({**nodes, **relayed})

    with tempfile.TemporaryDirectory(prefix="fpco") as short:  # Unix socket paths are short
        sock = Path(short) / "site.sock"
        kept, emptied = tmp_path / "kept", tmp_path / "emptied"
        for folder in (kept / "worker", emptied / "worker"):
            folder.mkdir(parents=True)  # as a site creates its --state-dir
        with site_worker(sock, kept / "worker"):
            stopped = run_server(
                sites(kept, sock),
                load_config(app / "fedprompt.yaml", ["federation.rounds=2"]),
                AppSettings(results_dir=tmp_path / "runs"),
            )
        assert sorted(fits(stopped)) == [0, 1, 2]
        copy = shutil.copytree(stopped.run_dir, tmp_path / "copy" / stopped.run_dir.name)
        config = load_config(app / "fedprompt.yaml")
        with site_worker(sock, kept / "worker"):
            resumed = run_server(sites(kept, sock), config, AppSettings(resume=stopped.run_dir))
        with site_worker(sock, emptied / "worker"):
            forgotten = run_server(sites(emptied, sock), config, AppSettings(resume=copy))

    assert_same_run(resumed, expected)
    for rows in fits(resumed).values():
        check_plans(rows)
    assert any(not torch.equal(forgotten.final_state[n], t) for n, t in expected.final_state.items())
    for cid, rows in fits(forgotten).items():
        assert rows[2][CLIENT_STATE_RESET] == 1.0, cid
        assert rows[2]["plan_depth"] == 1.0 and "plan_gain" not in rows[2], cid


def test_a_site_whose_update_was_lost_plans_from_the_records_the_server_used(planned_job):
    """Client 1's round-2 update is computed (its site stages the records it would carry) but never
    reaches the server. Its round 3 starts from the records of round 1, the last update the server
    used: it tries candidate 1 again (still untried as far as those records go) and credits
    candidate 0 with the gain from its round-1 score. The other clients plan by their own records."""
    app, _ = planned_job
    client_app = build_client_app(app / "fedprompt.yaml")
    nodes = client_app_nodes(client_app, range(3), {})
    lossy_node = list(nodes)[1]  # the node of partition 1

    def lose_round_two(message, node):
        reply = nodes[lossy_node](message, node)
        lost = message.metadata.message_type == "train" and read_instructions(message.content)[1].round == 2
        return None if lost else reply

    grid = InMemoryGrid({**nodes, lossy_node: lose_round_two})
    with tempfile.TemporaryDirectory() as runs:
        result = run_server(grid, load_config(app / "fedprompt.yaml"), AppSettings(results_dir=Path(runs)))

    assert [r.get("clients_accepted") for r in result.history] == [None, 3, 2, 3]
    rows = fits(result)[1]
    assert [r["accepted"] for r in rows] == [True, False, True]
    first, third = rows[0], rows[2]
    assert (third["plan_depth"], third["plan_capacity"]) == (2.0, 0.3)  # candidate 1, profiled again
    assert third["plan_gain"] == third["plan_score"] - first["plan_score"]
    assert not any(CLIENT_STATE_RESET in row for row in result.client_history)
    check_plans(fits(result)[0])  # the others plan by their records as ever
    check_plans(fits(result)[2])
