"""Secure aggregation on the Flower runtime: the configuration it refuses, and whole secure runs
through the in-memory grid against the plain in-process run (to the stated quantisation error),
with clients dropping at each stage."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flower_support import InMemoryGrid, client_app_nodes, tiny_config, write_app, write_dataset
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors import deserialize

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.execution.simulation import run_in_process
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.sampling import sample_clients
from fedprompt.flower import run_server
from fedprompt.flower.app_config import AppSettings
from fedprompt.flower.client_app import build_client_app
from fedprompt.flower.records import INSTRUCTIONS_RECORD, PAYLOAD_RECORD, instructions_record, payload_content
from fedprompt.flower.rounds import NotEnoughClientsError
from fedprompt.flower.secure_records import SECAGG_RECORD, read_stage_request, stage_record
from fedprompt.tasks.registry import build_experiment

SECURE = {"enabled": True}
TOFU = "trust-on-first-use"  # these tests are about the protocol; node keys have their own test


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has set before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def secure_config(data, **sections):
    config = tiny_config(data, num_clients=3, rounds=2, **sections)
    config["strategy"] = {"kind": "fedavg"}
    config["secure_aggregation"] = {**SECURE, **config.get("secure_aggregation", {})}
    return config


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"strategy": {"kind": "median"}}, "strategy.kind median needs the coordinate-wise median"),
        ({"strategy": {"kind": "trimmed-mean"}}, "needs the coordinate-wise order of the updates"),
        (
            {"strategy": {"kind": "krum"}, "partition": {"num_clients": 5}, "federation": {"min_clients": 3}},
            "strategy.kind krum needs the distances between the updates",
        ),
        (
            {"strategy": {"kind": "reliability"}, "partition": {"local_val_fraction": 0.2}},
            "needs each client's prompt and its agreement with the others",
        ),
        (
            {
                "strategy": {"kind": "fedbpt"},
                "prompt": {"kind": "intrinsic", "dim": 20},
                "optimizer": {"kind": "cmaes", "popsize": 4, "budget": 64, "batch_size": 16},
            },
            "strategy.kind fedbpt needs each client's CMA-ES search state",
        ),
        (
            {"strategy": {"kind": "scaffold"}, "optimizer": {"algorithm": "sgd"}},
            "strategy.kind scaffold needs each client's control-variate update",
        ),
        ({"robustness": {"max_update_norm": 1.0}}, "max_update_norm is a bound the server enforces on each"),
        ({"secure_aggregation": {"threshold": 1}}, "greater than or equal to 2"),
        ({"secure_aggregation": {"threshold": 4}}, r"threshold 4 must lie in 2\.\.3"),
        (
            {"partition": {"num_clients": 6}, "secure_aggregation": {"threshold": 3}},
            r"threshold 3 must lie in 4\.\.6: more than half",
        ),
        (
            {"federation": {"min_clients": 1, "fraction": 0.2}},
            "rounds sample 1 client, whose 'sum' is its update",
        ),
        ({"secure_aggregation": {"bits": 49}}, "less than or equal to 48"),
    ],
)
def test_secure_aggregation_refuses_what_needs_single_updates(tmp_path, sections, message):
    data = write_dataset(tmp_path / "data.jsonl")
    config = secure_config(data)
    for name, values in sections.items():  # a section that names its kind replaces the whole section
        config[name] = values if "kind" in values else {**config.get(name, {}), **values}
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_server_momentum_needs_only_the_mean_and_runs_under_secure_aggregation(tmp_path):
    config = secure_config(write_dataset(tmp_path / "data.jsonl"))
    config["strategy"] = {"kind": "fedavgm", "server_lr": 1.0, "momentum": 0.9}
    assert load_config(config).strategy.kind == "fedavgm"


def test_clients_per_round_is_what_sampling_draws(tmp_path):
    config = load_config(tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3))
    for fraction, min_clients, num in [(0.3, 2, 10), (0.55, 1, 9), (1.0, 2, 4), (0.01, 3, 50)]:
        federation = config.federation.model_copy(update={"fraction": fraction, "min_clients": min_clients})
        assert federation.clients_per_round(num) == len(
            sample_clients(range(num), fraction, min_clients, 0, 1)
        )


def test_a_secure_run_is_refused_in_process_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"secure_aggregation\.enabled runs on the Flower runtime"):
        fedprompt.run(secure_config(write_dataset(tmp_path / "data.jsonl")), output_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the site's side


def test_a_site_never_sends_a_plain_update_or_plays_along_with_other_settings(tmp_path):
    data = write_dataset(tmp_path / "data.jsonl")
    secure_app = build_client_app(write_app(tmp_path / "secure", secure_config(data)) / "fedprompt.yaml")
    plain_config = {**secure_config(data), "secure_aggregation": {"enabled": False}}
    plain_app = build_client_app(write_app(tmp_path / "plain", plain_config) / "fedprompt.yaml")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})

    train = Message(
        payload_content(b"\0", {INSTRUCTIONS_RECORD: instructions_record(1, FitInstructions(1, 5))}),
        dst_node_id=5,
        message_type="train",
    )
    with pytest.raises(ValueError, match="only through secure aggregation"):
        secure_app(train, context)

    def keys(**fields):
        base = {"participants": [0, 1, 2], "threshold": 2, "bits": 32, "clip-range": 1.0, **fields}
        content = RecordDict({SECAGG_RECORD: stage_record("keys", 1, 1, **base)})
        return Message(content, dst_node_id=5, message_type="train")

    with pytest.raises(ValueError, match="does not enable it"):
        plain_app(keys(), context)
    with pytest.raises(RuntimeError, match=r"settings differ from this site's.*'threshold': \(3, 2\)"):
        secure_app(keys(threshold=3), context)
    with pytest.raises(RuntimeError, match=r"'clip-range': \(8\.0, 1\.0\)"):
        secure_app(keys(**{"clip-range": 8.0}), context)
    with pytest.raises(RuntimeError, match="4 participants, more than the 3 a round samples"):
        secure_app(keys(participants=[0, 1, 2, 7]), context)
    reply = secure_app(keys(), context)
    assert sorted(reply.content.config_records[SECAGG_RECORD]) == ["c-pk", "s-pk", "seed-hash", "stage"]
    unmask = RecordDict(
        {SECAGG_RECORD: stage_record("unmask", 1, 1, survivors=[0, 1, 2], dropped=[], reveal=[])}
    )
    with pytest.raises(RuntimeError, match="stage 'unmask' arrived after stage 'keys'"):
        secure_app(Message(unmask, dst_node_id=5, message_type="train"), context)


# --------------------------------------------------------------------------- whole secure runs


def dropping(nodes, drops: dict[int, str]):
    """Node handlers in which client c stops answering at stage ``drops[c]`` (every round)."""

    def wrap(handler):
        def handle(message, node):
            if SECAGG_RECORD in message.content.config_records:
                stage, _, cid, _ = read_stage_request(message.content)
                if drops.get(cid) == stage:
                    return None
            return handler(message, node)

        return handle

    return {node: wrap(handler) for node, handler in nodes.items()}


def without_secure_aggregation(cfg):
    return load_config(cfg, ["secure_aggregation.enabled=false"])


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# The stated bound: c / (2L) per coordinate and round (L = floor((2^31 - 1) / 3), c = 1), about 7e-10,
# plus float32 rounding of the aggregated prompt (about 6e-8 at its magnitudes); the second round trains
# from that slightly different prompt. 1e-6 holds all of it; a prompt step of one round is about 1e-2.
TOLERANCE = 1e-6


def test_a_secure_run_gives_the_plain_runs_prompt_and_no_update_leaves_a_site(tmp_path):
    config = secure_config(write_dataset(tmp_path / "data.jsonl"))
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    experiment = build_experiment(without_secure_aggregation(cfg))
    # Uniform secure weights are FedAvg's example weights here: the three partitions are equal.
    assert len(set(experiment.example_counts().values())) == 1
    plain = run_in_process(experiment, without_secure_aggregation(cfg))

    client_app = build_client_app(app / "fedprompt.yaml")
    masked_replies = []

    def spy(handler):
        def handle(message, node):
            reply = handler(message, node)
            if PAYLOAD_RECORD in reply.content.array_records:
                masked_replies.append(bytes(reply.content.array_records[PAYLOAD_RECORD]["safetensors"].data))
            return reply

        return handle

    nodes = {node: spy(h) for node, h in client_app_nodes(client_app, range(3), {}).items()}
    grid = InMemoryGrid(nodes)
    result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs", node_keys=TOFU))

    assert max_difference(result.final_state, plain.final_state) <= TOLERANCE
    assert [r.get("clients_accepted") for r in result.history] == [None, 3, 3]
    # Nothing rides beside a masked input: no training loss, no count of clipped coordinates.
    assert all("train_loss" not in row for row in result.history)
    fits = [r for r in result.client_history if r["event"] == "fit"]
    assert fits and all(
        set(r) == {"round", "client_id", "event", "accepted", "bytes_up", "bytes_down", "num_examples"}
        for r in fits
    )
    # What left the sites in the masked stage: one uint32 vector each, nothing that decodes as a prompt.
    assert len(masked_replies) == 6
    for data in masked_replies:
        assert [(name, view["dtype"]) for name, view in deserialize(data)] == [("masked", "U32")]
    stages = [
        read_stage_request(m.content)[0] for m in grid.sent if SECAGG_RECORD in m.content.config_records
    ]
    assert {s: stages.count(s) for s in set(stages)} == {"keys": 6, "shares": 6, "masked": 6, "unmask": 6}


def test_clients_that_drop_leave_the_sum_of_the_survivors(tmp_path):
    # Five clients, threshold 3, weighted by the example counts the sites declared (their partition
    # sizes, as the in-process run weights them). Client 2 drops after the key exchange (never sends
    # its masked input) in every round: the run equals the in-process run in which client 2 fails
    # every round. Client 0 drops after sending its masked input (never helps unmask): its input is
    # still in the sum.
    config = secure_config(
        write_dataset(tmp_path / "data.jsonl"),
        partition={"num_clients": 5},
        secure_aggregation={"weights": "declared"},
    )
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    plain_cfg = without_secure_aggregation(cfg)
    experiment = build_experiment(plain_cfg)

    def dead(*args, **kwargs):
        raise ConnectionError("the site went down")

    experiment.clients[2].fit_payload = dead
    expected = run_in_process(experiment, plain_cfg)

    counts = experiment.example_counts()
    assert len(set(counts.values())) > 1  # unequal partitions: the declared weights matter
    client_app = build_client_app(app / "fedprompt.yaml")
    declared = {pid: {"num-examples": count} for pid, count in counts.items()}
    nodes = client_app_nodes(client_app, range(5), {}, partition_configs=declared)
    nodes = dropping(nodes, {2: "masked", 0: "unmask"})
    result = run_server(InMemoryGrid(nodes), cfg, AppSettings(results_dir=tmp_path / "runs", node_keys=TOFU))

    assert max_difference(result.final_state, expected.final_state) <= TOLERANCE
    rows = [r for r in result.client_history if r["event"] == "fit"]
    assert {(r["round"], r["client_id"]) for r in rows if not r["accepted"]} == {(1, 2), (2, 2)}
    assert all("stage masked: no reply" in r["reason"] for r in rows if not r["accepted"])


def test_below_the_threshold_a_secure_round_stops_the_run_with_its_reason(tmp_path):
    config = secure_config(write_dataset(tmp_path / "data.jsonl"))
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    client_app = build_client_app(app / "fedprompt.yaml")
    nodes = dropping(client_app_nodes(client_app, range(3), {}), {1: "shares", 2: "masked"})
    with pytest.raises(NotEnoughClientsError, match="1 clients sent a masked input, fewer than the secure"):
        run_server(InMemoryGrid(nodes), cfg, AppSettings(results_dir=tmp_path / "runs", node_keys=TOFU))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "checkpoint.safetensors").exists()  # round 1 never completed


def garbling(nodes, senders: set[int]):
    """Node handlers in which the clients in ``senders`` answer the shares stage with random bytes
    of the right size in place of every encrypted pair of shares."""

    def wrap(handler):
        def handle(message, node):
            reply = handler(message, node)
            if SECAGG_RECORD in message.content.config_records:
                stage, _, cid, _ = read_stage_request(message.content)
                if stage == "shares" and cid in senders:
                    record = reply.content.config_records[SECAGG_RECORD]
                    record["ciphertexts"] = [os.urandom(len(c)) for c in record["ciphertexts"]]
            return reply

        return handle

    return {node: wrap(handler) for node, handler in nodes.items()}


def test_a_site_sending_garbage_shares_is_dropped_and_the_other_nine_are_summed(tmp_path):
    # Ten sites, site 6 encrypts garbage for everyone. Today the first honest site to decrypt its
    # share raised, and the round stopped. Now site 6 is dropped (its masks come off with the
    # survivors' mask keys with it) and the round is the plain round of the other nine.
    config = secure_config(
        write_dataset(tmp_path / "data.jsonl"),
        partition={"num_clients": 10},
        federation={"rounds": 1, "min_clients": 9},
        secure_aggregation={"weights": "declared"},
    )
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    plain_cfg = without_secure_aggregation(cfg)
    experiment = build_experiment(plain_cfg)

    def garbage_site(*args, **kwargs):
        raise ConnectionError("dropped")

    experiment.clients[6].fit_payload = garbage_site
    expected = run_in_process(experiment, plain_cfg)

    client_app = build_client_app(app / "fedprompt.yaml")
    declared = {pid: {"num-examples": count} for pid, count in experiment.example_counts().items()}
    nodes = garbling(client_app_nodes(client_app, range(10), {}, partition_configs=declared), {6})
    result = run_server(InMemoryGrid(nodes), cfg, AppSettings(results_dir=tmp_path / "runs", node_keys=TOFU))
    assert max_difference(result.final_state, expected.final_state) <= TOLERANCE
    (row,) = [r for r in result.client_history if r["client_id"] == 6 and r["event"] == "fit"]
    assert not row["accepted"] and "could decrypt the shares it sent; dropped" in row["reason"]
    assert result.history[1]["clients_accepted"] == 9


def test_min_clients_is_checked_before_anyone_unmasks(tmp_path):
    config = secure_config(write_dataset(tmp_path / "data.jsonl"), partition={"num_clients": 4})
    config["federation"]["min_clients"] = 4
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    client_app = build_client_app(app / "fedprompt.yaml")
    grid = InMemoryGrid(dropping(client_app_nodes(client_app, range(4), {}), {3: "masked"}))
    with pytest.raises(
        NotEnoughClientsError, match=r"3 clients' inputs would be summed, fewer than .*nothing was unmasked"
    ):
        run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs", node_keys=TOFU))
    stages = [
        read_stage_request(m.content)[0] for m in grid.sent if SECAGG_RECORD in m.content.config_records
    ]
    assert "unmask" not in stages  # today the survivors unmasked first, then the round was refused


def failing_as_flower_does(nodes):
    """Node handlers whose exceptions come back as error replies, as a SuperNode sends them."""

    def wrap(handler):
        def handle(message, node):
            try:
                return handler(message, node)
            except Exception as exc:
                return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)

        return handle

    return {node: wrap(handler) for node, handler in nodes.items()}


def test_a_site_never_sends_a_second_masked_input_for_a_round(tmp_path):
    # The server collects round 1's masked inputs, then stops (here: nobody answers the unmask
    # stage) and runs round 1 again. Today every site masked again, and two sums of round 1 over
    # different survivors would differ by one site's update. Each site's ledger now refuses.
    config = secure_config(write_dataset(tmp_path / "data.jsonl"))
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    client_app = build_client_app(app / "fedprompt.yaml")
    nodes = failing_as_flower_does(client_app_nodes(client_app, range(3), {}))
    with pytest.raises(NotEnoughClientsError, match="0 clients sent unmasking shares"):
        run_server(
            InMemoryGrid(dropping(nodes, dict.fromkeys(range(3), "unmask"))),
            cfg,
            AppSettings(results_dir=tmp_path / "first", node_keys=TOFU),
        )
    with pytest.raises(NotEnoughClientsError) as stopped:
        run_server(InMemoryGrid(nodes), cfg, AppSettings(results_dir=tmp_path / "again", node_keys=TOFU))
    assert str(stopped.value).count("already sent its masked input for round 1 of run 'flower-tiny'") == 3


def test_a_secure_run_needs_registered_node_keys_or_trust_on_first_use_by_name(tmp_path):
    # Today any node that claimed a partition first held it, also under secure aggregation.
    config = secure_config(write_dataset(tmp_path / "data.jsonl"))
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    client_app = build_client_app(app / "fedprompt.yaml")
    with pytest.raises(ConfigError, match="need SuperNode authentication, so that no node can squat"):
        run_server(InMemoryGrid({}), cfg, AppSettings(results_dir=tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()

    keys = {node: ec.generate_private_key(ec.SECP384R1()).public_key() for node in range(3)}
    pem = {
        n: k.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for n, k in keys.items()
    }
    ssh = {
        n: k.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        for n, k in keys.items()
    }
    nodes = client_app_nodes(client_app, range(3), {})
    node_ids = sorted(nodes)
    # partition p's registered key is that of the node hosting it; a squatter (another key) is refused
    (tmp_path / "keys.json").write_text(json.dumps({str(p): ssh[p] for p in range(3)}))
    squatter = 999
    nodes[squatter] = nodes[node_ids[0]]  # claims partition 0 too, with a key not registered for it
    grid = InMemoryGrid(nodes, keys={**{node_ids[p]: pem[p] for p in range(3)}, squatter: b"other-key"})
    settings = AppSettings(results_dir=tmp_path / "runs", node_keys=str(tmp_path / "keys.json"))
    result = run_server(grid, cfg, settings)
    assert result.summary["node_binding"] == "registered keys (node-keys)"
    bindings = json.loads((result.run_dir / "partitions.json").read_text())["partitions"]
    assert {int(p): b["node_id"] for p, b in bindings.items()} == {p: node_ids[p] for p in range(3)}
    (tmp_path / "short.json").write_text(json.dumps({"0": ssh[0]}))
    with pytest.raises(ConfigError, match=r"names no key for partitions \[1, 2\]"):
        run_server(
            grid, cfg, AppSettings(results_dir=tmp_path / "r2", node_keys=str(tmp_path / "short.json"))
        )


def test_a_resumed_run_skips_a_secure_round_whose_masked_inputs_went_out(tmp_path):
    # Round 2's masked inputs reach the server, then it stops before unmasking. Sites answer a
    # round's masked stage once, so the resumed run counts round 2 as abandoned and goes on.
    config = secure_config(write_dataset(tmp_path / "data.jsonl"))
    config["federation"]["rounds"] = 3
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    client_app = build_client_app(app / "fedprompt.yaml")
    nodes = failing_as_flower_does(client_app_nodes(client_app, range(3), {}))

    def silent_at_round_2_unmask(handler):
        def handle(message, node):
            if SECAGG_RECORD in message.content.config_records:
                stage, round_num, _, _ = read_stage_request(message.content)
                if (stage, round_num) == ("unmask", 2):
                    return None
            return handler(message, node)

        return handle

    stopping = {node: silent_at_round_2_unmask(h) for node, h in nodes.items()}
    with pytest.raises(NotEnoughClientsError, match="0 clients sent unmasking shares"):
        run_server(InMemoryGrid(stopping), cfg, AppSettings(results_dir=tmp_path / "runs", node_keys=TOFU))
    (run_dir,) = (tmp_path / "runs").iterdir()
    resumed = run_server(InMemoryGrid(nodes), cfg, AppSettings(resume=run_dir, node_keys=TOFU))
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[2]["aggregation_error"].startswith("round abandoned")
    assert resumed.history[1]["clients_accepted"] == resumed.history[3]["clients_accepted"] == 3
