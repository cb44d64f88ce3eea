"""The Flower runtime without processes: the ServerApp strategy on mock replies (as Flower tests its
own strategies), the ClientApp called directly, and whole runs through an in-memory grid."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch
from flower_support import (
    InMemoryGrid,
    as_flower_runtime,
    assert_same_history,
    client_app_nodes,
    tiny_config,
    write_app,
    write_dataset,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedprompt
import fedprompt.flower.client_app as client_app_module
from fedprompt.config import ConfigError, load_config
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import decode_state, encode_update
from fedprompt.federation.privacy.accounting import PrivacyPlan
from fedprompt.federation.privacy.central import CentralPrivacy
from fedprompt.federation.privacy.noise import SeededNoise
from fedprompt.federation.sampling import poisson_sample_clients, sample_clients
from fedprompt.federation.server import Server
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.federation.update_pipeline import ExampleBounds
from fedprompt.flower import run_server
from fedprompt.flower.app_config import AppSettings, load_app_config
from fedprompt.flower.bindings import NodeIdentity, PartitionBindings
from fedprompt.flower.client_app import build_client_app
from fedprompt.flower.records import (
    EVAL_RECORD,
    INSTRUCTIONS_RECORD,
    NODE_RECORD,
    PAYLOAD_RECORD,
    instructions_record,
    node_record,
    payload_content,
    read_instructions,
    read_payload,
)
from fedprompt.flower.rounds import NotEnoughClientsError
from fedprompt.flower.site import ExperimentCache
from fedprompt.flower.strategy import FedPromptStrategy

STATE = {"prompt": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has set before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def make_server() -> Server:
    return Server(
        STATE,
        FedAvg(),
        range(5),
        fraction=0.6,
        min_clients=2,
        seed=7,
        wire_dtype="float32",
        max_bytes=1 << 20,
    )


def make_strategy(nodes: dict[int, int] | None = None) -> FedPromptStrategy:
    strategy = FedPromptStrategy(make_server(), num_rounds=3, local_evaluation=True)
    strategy.nodes = dict(nodes if nodes is not None else {cid: 100 + cid for cid in range(5)})
    return strategy


def configured(strategy: FedPromptStrategy, round_num: int = 1) -> dict[int, Message]:
    """Client id -> train message, with ids as a grid gives them when it pushes."""
    grid = InMemoryGrid({node: lambda m, n: None for node in strategy.nodes.values()})
    messages = list(strategy.configure_train(round_num, ArrayRecord(), ConfigRecord(), grid))
    grid.push_messages(messages)
    by_node = {node: cid for cid, node in strategy.nodes.items()}
    return {by_node[m.metadata.dst_node_id]: m for m in messages}


def update_reply(message: Message, cid: int, value: float, n: int) -> Message:
    update = Update(cid, {"prompt": torch.full((2, 3), value)}, n, {"train_loss": 0.5})
    return Message(payload_content(encode_update(update, "float32")), reply_to=message)


def test_configure_train_samples_with_the_run_seed_and_carries_the_servers_bytes():
    strategy = make_strategy()
    messages = configured(strategy)
    twin = make_server()
    assert sorted(messages) == sample_clients(range(5), 0.6, 2, 7, 1) == twin.sample(1)
    # sampling is fedprompt's over client ids: the nodes' ids and their order play no part
    other = make_strategy({cid: 999 - 3 * cid for cid in reversed(range(5))})
    assert sorted(configured(other)) == sorted(messages)
    for cid, message in messages.items():
        assert message.metadata.dst_node_id == 100 + cid
        assert message.metadata.message_type == "train"
        assert read_payload(message.content, 1 << 20) == twin.downlink(1, cid)
        assert read_instructions(message.content) == (cid, twin.instructions(1, cid))


def test_aggregate_train_on_mock_replies_validates_and_averages_in_client_order():
    strategy = make_strategy()
    messages = configured(strategy)
    a, b, c = sorted(messages)
    replies = [
        update_reply(messages[a], a, 1.0, 1),
        update_reply(messages[b], b, 4.0, 3),
        Message(Error(code=0, reason="CUDA out of memory"), reply_to=messages[c]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.equal(strategy.server.global_state["prompt"], torch.full((2, 3), (1.0 * 1 + 4.0 * 3) / 4))
    record = strategy.last_record
    assert [u.client_id for u in record.accepted] == [a, b]
    assert "CUDA out of memory" in record.rejected[c]
    assert metrics["clients_accepted"] == 2 and metrics["clients_rejected"] == 1
    assert read_payload(RecordDict({PAYLOAD_RECORD: arrays}), 1 << 20)  # the new global prompt, as bytes
    assert strategy.server.completed_rounds == 1


def test_reply_order_does_not_change_the_global_prompt():
    results = []
    for seed in range(3):
        strategy = make_strategy()
        messages = configured(strategy)
        replies = [update_reply(m, cid, 0.1 * cid + 0.37, 2 + cid) for cid, m in messages.items()]
        random.Random(seed).shuffle(replies)
        strategy.aggregate_train(1, replies)
        results.append(strategy.server.global_state["prompt"])
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_bad_payloads_and_missing_replies_are_rejected_and_too_few_stop_the_round():
    strategy = make_strategy()
    messages = configured(strategy)
    a, b, c = sorted(messages)
    garbage = RecordDict({PAYLOAD_RECORD: ArrayRecord()})
    wrong_client = update_reply(messages[a], b, 1.0, 1)  # a's reply claims to be client b
    replies = [wrong_client, Message(garbage, reply_to=messages[b])]  # and c never answers
    with pytest.raises(NotEnoughClientsError, match="min_clients=2"):
        strategy.aggregate_train(1, replies)
    rejected = strategy.last_record.rejected
    assert "expected" in rejected[a] and "safetensors" in rejected[b] and "timeout" in rejected[c]
    assert torch.equal(strategy.server.global_state["prompt"], STATE["prompt"])  # not aggregated
    assert strategy.server.completed_rounds == 0


def test_a_sampled_partition_without_a_node_is_left_out_and_the_round_goes_on():
    strategy = make_strategy()
    sampled = strategy.server.sample(1)
    del strategy.nodes[sampled[0]]
    messages = configured(strategy)
    assert sorted(messages) == sampled[1:]
    strategy.aggregate_train(1, [update_reply(m, cid, 2.0, 1) for cid, m in messages.items()])
    assert "no SuperNode hosts partition" in strategy.last_record.rejected[sampled[0]]
    assert torch.equal(strategy.server.global_state["prompt"], torch.full((2, 3), 2.0))


def test_a_poisson_round_without_clients_still_releases_dp_noise():
    plan = PrivacyPlan("central", 1.0, 2.0, 1e-5, 3, 5, 1.5, poisson=True)
    server = Server(
        STATE,
        FedAvg(),
        range(5),
        fraction=0.3,
        min_clients=1,
        seed=7,
        wire_dtype="float32",
        max_bytes=1 << 20,
        stages=[CentralPrivacy(plan, robustness_bound=None, noise=SeededNoise(7))],
        poisson_sampling=True,
    )
    empty = next(r for r in range(1, 200) if not poisson_sample_clients(range(5), 0.3, 7, r))
    strategy = make_strategy()
    strategy.server = server
    assert configured(strategy, empty) == {}
    _, metrics = strategy.aggregate_train(empty, [])
    assert metrics["epsilon"] == plan.epsilon(empty) and metrics["clients_sampled"] == 0
    assert not torch.equal(server.global_state["prompt"], STATE["prompt"])  # noise, not a skipped round
    assert strategy.last_record.aggregation_error is None


def _claims(strategy: FedPromptStrategy, grid: InMemoryGrid, claims: dict[int, Any]) -> list[int]:
    """Run one query round in which node n answers ``claims[n]`` (a partition id, (partition, declared
    examples), or an Error); the ids of the nodes that were asked."""
    queries = {m.metadata.dst_node_id: m for m in strategy.configure_query(grid)}
    grid.push_messages(queries.values())
    replies = []
    for node, claim in claims.items():
        if isinstance(claim, Error):
            replies.append(Message(claim, reply_to=queries[node]))
        else:
            pid, count = claim if isinstance(claim, tuple) else (claim, None)
            content = RecordDict({NODE_RECORD: node_record(pid, count)})
            replies.append(Message(content, reply_to=queries[node]))
    strategy.aggregate_query(replies)
    return sorted(queries)


def test_a_partition_stays_with_the_node_that_first_claimed_it(caplog):
    # Trust on first use (a grid without keys): node 11 claims partition 0 first and keeps it; 12's
    # claim of 0 is refused, also after 11 left; 11 back under its node id gets it back.
    strategy = make_strategy({})
    grid = InMemoryGrid({node: lambda m, n: None for node in (11, 12, 13, 14)})
    asked = _claims(strategy, grid, {11: 0, 12: 0, 13: 9, 14: Error(code=0, reason="no partition-id")})
    assert asked == [11, 12, 13, 14] and strategy.nodes == {0: 11}
    assert "node 12 claims partition 0, which is bound to node 11" in caplog.text
    assert _claims(strategy, grid, {}) == [14]  # asked again; the others answered
    del grid.nodes[11]
    strategy.configure_query(grid)
    assert strategy.nodes == {}  # nobody hosts 0 now ...
    grid.nodes[15] = lambda m, n: None
    _claims(strategy, grid, {15: 0})
    assert strategy.nodes == {}  # ... and a newcomer cannot take it over
    grid.nodes[11] = lambda m, n: None
    _claims(strategy, grid, {11: 0})
    assert strategy.nodes == {0: 11}
    assert strategy.bindings.claim(1, NodeIdentity(11), None) == (  # one node, one partition
        "node 11 claims partition 1 but already hosts partition 0; refused"
    )


def test_with_node_keys_a_partition_is_bound_to_the_key_not_the_node_id():
    # SuperNode authentication: the SuperLink knows each node by its registered public key. A node
    # that re-registers its key (a new node id) gets its partition back; another key never does.
    strategy = make_strategy({})
    grid = InMemoryGrid({21: lambda m, n: None, 22: lambda m, n: None}, keys={21: b"key-A", 22: b"key-B"})
    _claims(strategy, grid, {21: 0, 22: 1})
    assert strategy.nodes == {0: 21, 1: 22}
    del grid.nodes[21]
    grid.nodes[31] = lambda m, n: None
    grid.keys[31] = b"key-C"
    _claims(strategy, grid, {31: 0})
    assert strategy.nodes == {1: 22}  # key C may not take partition 0
    grid.nodes[41] = lambda m, n: None
    grid.keys[41] = b"key-A"
    _claims(strategy, grid, {41: 0})
    assert strategy.nodes == {0: 41, 1: 22}  # key A under its new node id
    assert strategy.bindings.bindings[0].node == NodeIdentity(41, b"key-A")


def test_a_declared_example_count_bounds_the_clients_weight_for_the_run(caplog):
    server = make_server()
    server.example_bounds = ExampleBounds(None, cap=100)  # robustness.max_examples
    strategy = FedPromptStrategy(server, num_rounds=3)
    grid = InMemoryGrid({100 + cid: lambda m, n: None for cid in range(5)})
    _claims(strategy, grid, {100: (0, 5), 101: (1, 1000), 102: 2, 103: 3, 104: 4})
    assert strategy.bindings.declared == {0: 5, 1: 100}  # capped at registration
    del grid.nodes[100]
    strategy.configure_query(grid)
    grid.nodes[100] = lambda m, n: None
    _claims(strategy, grid, {100: (0, 10**6)})  # declares more when it comes back: ignored
    assert strategy.bindings.declared[0] == 5 and "keeps the 5 it declared" in caplog.text

    messages = configured(strategy)
    replies = [update_reply(m, cid, 1.0 + cid, 10**6) for cid, m in messages.items()]
    strategy.aggregate_train(1, replies)
    record = strategy.last_record
    assert {cid: record.clamped[cid] for cid in record.clamped} == dict.fromkeys(messages, 10**6)
    weights = {u.client_id: u.num_examples for u in record.accepted}
    assert weights == {cid: {0: 5, 1: 100}.get(cid, 100) for cid in messages}


def test_a_huge_declaration_does_not_become_the_global_prompt_with_default_settings(caplog):
    # Today, with no robustness.max_examples, a site declaring 10^19 at registration (and claiming
    # it) got 10^19 / (10^19 + 150) of the round: the global prompt became its prompt.
    config = load_config(overrides=["partition.num_clients=5"])
    assert config.robustness.max_examples is None and config.robustness.max_weight_ratio == 5.0
    strategy = make_strategy({})
    grid = InMemoryGrid({100 + cid: lambda m, n: None for cid in range(5)})
    _claims(strategy, grid, {100: (0, 10**19), 101: (1, 50), 102: (2, 50), 103: (3, 50), 104: (4, 50)})
    assert "partition 0 declared 10000000000000000000 examples" in caplog.text  # reported at registration
    round_num = next(r for r in range(1, 50) if 0 in sample_clients(range(5), 0.6, 2, 7, r))
    messages = configured(strategy, round_num)
    replies = [
        update_reply(m, cid, 100.0 if cid == 0 else 0.0, 10**19 if cid == 0 else 50)
        for cid, m in messages.items()
    ]
    strategy.aggregate_train(round_num, replies)
    honest = len(messages) - 1
    share = 250 / (250 + 50 * honest)  # 5 x the median count of 50
    assert torch.allclose(strategy.server.global_state["prompt"], torch.full((2, 3), 100.0 * share))
    assert share <= 5 / 7 and strategy.last_record.clamped[0] == 10**19


def test_bindings_are_kept_with_the_run_and_a_damaged_file_is_refused(tmp_path):
    bindings = PartitionBindings(max_examples=50)
    assert bindings.claim(0, NodeIdentity(7, b"k0"), 80) is None
    bindings.attach(tmp_path / "partitions.json")
    assert bindings.claim(1, NodeIdentity(8), None) is None
    loaded = PartitionBindings.load(tmp_path / "partitions.json", max_examples=50)
    assert loaded.bindings == bindings.bindings and loaded.declared == {0: 50}
    assert loaded.claim(0, NodeIdentity(9, b"other"), 80) is not None
    (tmp_path / "partitions.json").write_text('{"partitions": {"0": {"node_id": 1}}}')
    with pytest.raises(ValueError, match="is not a partition-bindings file"):
        PartitionBindings.load(tmp_path / "partitions.json")


def test_flowers_own_strategy_loop_runs_the_strategy():
    # Nodes that host partitions 0..4 and answer every train message with state + 1.
    def node(message: Message, node_id: int) -> Message:
        if message.metadata.message_type == "query":
            return Message(RecordDict({NODE_RECORD: node_record(node_id - 100)}), reply_to=message)
        cid, _ = read_instructions(message.content)
        state, _ = decode_state(read_payload(message.content, 1 << 20), make_server().downlink_spec)
        return update_reply(message, cid, float(state["prompt"][0, 0]) + 1, 1)

    grid = InMemoryGrid({100 + cid: node for cid in range(5)})
    strategy = make_strategy({})
    strategy.local_evaluation = False
    strategy.map_nodes(grid, wait_for=5, timeout=5, reply_timeout=5)
    result = strategy.start(grid, strategy.global_arrays(), num_rounds=3, timeout=5)
    assert strategy.server.completed_rounds == 3
    assert torch.equal(strategy.server.global_state["prompt"], torch.full((2, 3), 3.0))  # 0 + 1 + 1 + 1
    assert result.arrays.object_id == strategy.global_arrays().object_id


def test_aggregate_evaluate_weights_local_metrics_by_examples():
    strategy = make_strategy({0: 100, 1: 101, 2: 102})
    strategy.evaluate_every = 2
    assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), InMemoryGrid({}))) == []
    messages = list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), InMemoryGrid({})))
    InMemoryGrid({}).push_messages(messages)
    metrics = [
        {"accuracy": 0.5, "loss": 1.0, "num-examples": 10.0},
        {"accuracy": 1.0, "loss": 0.0, "num-examples": 30.0},
        {},  # a client without a held-out split
    ]
    replies = [
        Message(RecordDict({EVAL_RECORD: MetricRecord(m)}), reply_to=msg)
        for msg, m in zip(messages, metrics, strict=True)
    ]
    local = strategy.aggregate_evaluate(2, replies)
    assert local["local_accuracy"] == pytest.approx(0.875) and local["local_loss"] == pytest.approx(0.25)
    assert strategy.evaluation_due(0) and strategy.evaluation_due(3)  # the initial and the last round


def test_flower_runtime_in_memory_gives_the_in_process_run(tmp_path, monkeypatch):
    # Sampling 2 of 3, FedAdam, local evaluation through evaluate messages: every number the
    # in-process run writes must come out the same, and each "process" builds its backbone once.
    config = tiny_config(
        write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2, federation={"fraction": 0.6}
    )
    config["federation"]["local_evaluation"] = True
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)

    cache = ExperimentCache()
    monkeypatch.setattr(client_app_module.InProcessSite, "_cache", cache)
    client_app = build_client_app(app / "fedprompt.yaml")
    grid = InMemoryGrid(client_app_nodes(client_app, range(3), {}))
    result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs"))

    assert torch.equal(result.final_state["prompt.embeddings"], expected.final_state["prompt.embeddings"])
    assert_same_history(result.history, expected.history)
    assert cache.builds == 1  # one backbone for every message of the run
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 9 and kinds.count("query") == 3
    assert (result.run_dir / "final_prompt.safetensors").is_file()


def test_resume_continues_a_flower_run_from_its_checkpoint(tmp_path):
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=2, rounds=2)
    cfg = load_config(config)
    client_app = build_client_app(write_app(tmp_path / "app", config) / "fedprompt.yaml")
    full = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(2), {})), cfg, AppSettings(results_dir=tmp_path)
    )

    stopped = load_config(config, ["federation.rounds=1"])
    first = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(2), {})), stopped, AppSettings(results_dir=tmp_path)
    )
    bound = json.loads((first.run_dir / "partitions.json").read_text())["partitions"]
    assert {pid: entry["node_id"] for pid, entry in bound.items()} == {"0": 1001, "1": 1008}
    # Other nodes claiming the partitions of the resumed run are refused: the bindings came back.
    impostors = {node + 1: handler for node, handler in client_app_nodes(client_app, range(2), {}).items()}
    with pytest.raises(NotEnoughClientsError, match="only 0 SuperNodes"):
        run_server(InMemoryGrid(impostors), cfg, AppSettings(resume=first.run_dir, node_wait_timeout=0.01))
    resumed = run_server(
        InMemoryGrid(client_app_nodes(client_app, range(2), {})), cfg, AppSettings(resume=first.run_dir)
    )
    assert torch.equal(resumed.final_state["prompt.embeddings"], full.final_state["prompt.embeddings"])
    assert [row["round"] for row in resumed.history] == [0, 1, 2]


def test_client_app_names_the_fix_for_a_node_without_a_partition(tmp_path):
    app = write_app(tmp_path / "app", tiny_config(write_dataset(tmp_path / "data.jsonl")))
    client_app = build_client_app(app / "fedprompt.yaml")
    query = Message(RecordDict(), dst_node_id=5, message_type="query")
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="--node-config 'partition-id="):
        client_app(query, context)
    context.node_config = {"partition-id": 1, "num-partitions": 10}
    with pytest.raises(ConfigError, match=r"num-partitions=10 but partition\.num_clients is 3"):
        client_app(query, context)
    context.node_config = {"partition-id": 2}
    reply = client_app(query, context)
    assert dict(reply.content.config_records[NODE_RECORD]) == {"partition-id": 2}
    context.node_config = {"partition-id": 2, "num-examples": 0}
    with pytest.raises(ConfigError, match="'num-examples' is 0; give the partition's number"):
        client_app(query, context)
    context.node_config = {"partition-id": 2, "num-examples": 50}
    reply = client_app(query, context)
    assert dict(reply.content.config_records[NODE_RECORD]) == {"partition-id": 2, "num-examples": 50}
    train = Message(
        payload_content(
            b"not safetensors", {INSTRUCTIONS_RECORD: instructions_record(1, FitInstructions(1, 5))}
        ),
        dst_node_id=5,
        message_type="train",
    )
    with pytest.raises(ValueError, match="client 1; this node hosts partition 2"):
        client_app(train, context)


def test_run_config_values_are_checked():
    settings = AppSettings.from_run_config(
        {"fedprompt-overrides": "federation.rounds=3 seed=1", "round-timeout": 30, "results-dir": "out"}
    )
    assert settings.overrides == ("federation.rounds=3", "seed=1") and settings.round_timeout == 30.0
    with pytest.raises(ConfigError, match="round-timeout"):
        AppSettings.from_run_config({"round-timeout": -1})
    with pytest.raises(ConfigError, match="results-dir"):
        AppSettings.from_run_config({"results-dir": 3})


@pytest.mark.parametrize(
    "override",
    [
        "backbone.model=evil/model",
        "backbone.url=http://attacker.example",
        "backbone.token_env=AWS_SECRET_ACCESS_KEY",
        "data.files.train=/etc/shadow",
        "data={source: hub, name: attacker/data}",
        "partition.num_clients=1",
        "runtime.device=cuda",
        "output.dir=/tmp/elsewhere",
        "payload.max_bytes=99999999999",
        "personalization.local=[]",
        "secure_aggregation.enabled=false",
    ],
)
def test_the_server_cannot_override_what_a_site_decides(tmp_path, monkeypatch, override):
    # The ClientApp refuses the run config before it builds anything, naming the field.
    app = write_app(tmp_path / "app", tiny_config(write_dataset(tmp_path / "data.jsonl")))
    cache = ExperimentCache()
    monkeypatch.setattr(client_app_module.InProcessSite, "_cache", cache)
    client_app = build_client_app(app / "fedprompt.yaml")
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config={"fedprompt-overrides": f"federation.rounds=3 '{override}'"},
    )
    query = Message(RecordDict(), dst_node_id=5, message_type="query")
    field = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"may not change {field!r}.*may override only name, seed"):
        client_app(query, context)
    assert cache.builds == 0


def test_the_server_may_override_how_the_federation_learns(tmp_path):
    app = write_app(tmp_path / "app", tiny_config(write_dataset(tmp_path / "data.jsonl")))
    overrides = "name=other seed=9 federation.rounds=7 optimizer.lr=0.5 'strategy={kind: fedprox, mu: 0.2}' "
    overrides += "robustness.max_examples=9"
    settings = AppSettings.from_run_config({"fedprompt-overrides": overrides})
    config = load_app_config(app / "fedprompt.yaml", settings)
    assert (config.name, config.seed, config.federation.rounds, config.optimizer.lr) == ("other", 9, 7, 0.5)
    assert config.strategy.mu == 0.2 and config.robustness.max_examples == 9


def test_reproducible_dp_noise_is_refused_on_flower(tmp_path):
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"))
    config["federation"]["min_clients"] = 1
    config["strategy"] = {"kind": "fedavg"}
    config["privacy"] = {"kind": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}
    app = write_app(tmp_path / "app", config)
    assert load_app_config(app / "fedprompt.yaml", AppSettings()).privacy.noise_seed == "system"
    config["privacy"]["noise_seed"] = "reproducible-insecure"
    app = write_app(tmp_path / "app2", config)
    with pytest.raises(ConfigError, match="reproducible-insecure derives the noise from the configuration"):
        load_app_config(app / "fedprompt.yaml", AppSettings())


def test_fedbpt_runs_on_the_flower_runtime_as_in_process(tmp_path):
    # Black-box clients (CMA-ES on an intrinsic prompt) and the FedBPT server: sigma and the
    # global CMA-ES state travel as extras in the same payloads; the result must not change.
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2)
    config["prompt"] = {"kind": "intrinsic", "dim": 20, "num_tokens": 4}
    config["optimizer"] = {"kind": "cmaes", "popsize": 6, "budget": 6 * 16 * 2, "batch_size": 16}
    config["strategy"] = {"kind": "fedbpt"}
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)

    client_app = build_client_app(app / "fedprompt.yaml")
    grid = InMemoryGrid(client_app_nodes(client_app, range(3), {}))
    result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs"))

    assert sorted(result.final_state) == sorted(expected.final_state)
    for name, tensor in expected.final_state.items():
        assert torch.equal(result.final_state[name], tensor), name
    assert [r.get("clients_accepted") for r in result.history] == [None, 3, 3]
    down = [r["bytes_down_per_client"] for r in result.history[1:]]
    assert down == [r["bytes_down_per_client"] for r in expected.history[1:]]


def test_held_out_acceptance_on_the_flower_runtime_gives_the_in_process_run(tmp_path):
    # The ServerApp keeps the held-out rows back and scores each candidate; every site carves the
    # same rows out of its partition. A refused round skips on both runtimes alike.
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=3)
    config["prompt"] = {"kind": "intrinsic", "dim": 20, "num_tokens": 4}
    config["optimizer"] = {"kind": "cmaes", "popsize": 6, "budget": 6 * 4, "batch_size": 4}  # noisy: refusals
    config["strategy"] = {"kind": "fedbpt", "sigma_decay": 0.8}
    config["federation"]["acceptance"] = {"held_out_per_class": 3}
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)

    client_app = build_client_app(app / "fedprompt.yaml")
    grid = InMemoryGrid(client_app_nodes(client_app, range(3), {}))
    result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs"))

    assert torch.equal(result.final_state["prompt.z"], expected.final_state["prompt.z"])
    keys = ("acceptance_score", "acceptance_candidate_score", "acceptance_accepted", "aggregation_error")
    assert [[r.get(k) for k in keys] for r in result.history] == [
        [r.get(k) for k in keys] for r in expected.history
    ]
    assert [r["acceptance_accepted"] for r in result.history[1:]] == [1, 0, 1]  # round 2 was refused


@pytest.mark.slow
def test_a_fedkseed_site_with_other_directions_is_rejected_on_flower_and_the_round_goes_on(tmp_path, caplog):
    # FedKSeed's server sends the fingerprint of the pool's first directions in every train message;
    # the site hosting partition 2 runs its own copy of the app configured with another run seed, so
    # its seed pool (and every direction it would step along) differs. Its ClientApp refuses to step
    # and fails the message; the ServerApp logs the rejection with the fingerprints and aggregates the
    # other two clients every round: exactly the in-process run in which client 2 holds that pool.
    from fedprompt.execution.simulation import run_in_process
    from fedprompt.federation.strategies.fedkseed import KSeedRule, kseed_setup
    from fedprompt.tasks.registry import build_experiment

    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), num_clients=3, rounds=2)
    config["federation"]["min_clients"] = 2
    config["optimizer"] = {"kind": "spsa", "lr": 0.1, "epsilon": 0.01, "budget": 2 * 16 * 8, "batch_size": 16}
    config["strategy"] = {"kind": "fedkseed", "num_seeds": 256}
    app = write_app(tmp_path / "app", config)
    other_site = write_app(tmp_path / "other-site", {**config, "seed": config["seed"] + 1})
    cfg, other = load_config(app / "fedprompt.yaml"), load_config(other_site / "fedprompt.yaml")
    assert kseed_setup(other).pool_seed != kseed_setup(cfg).pool_seed

    nodes = client_app_nodes(build_client_app(app / "fedprompt.yaml"), range(2), {})
    mismatched = client_app_nodes(build_client_app(other_site / "fedprompt.yaml"), [2], {}, first_node=2001)
    grid = InMemoryGrid({n: as_flower_runtime(h) for n, h in {**nodes, **mismatched}.items()})
    with caplog.at_level("WARNING", logger="fedprompt"):
        result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs"))

    assert [r.get("clients_accepted") for r in result.history] == [None, 2, 2]
    assert [r.get("clients_rejected") for r in result.history] == [None, 1, 1]
    fits = [r for r in result.client_history if r.get("event") == "fit"]
    assert sorted((r["round"], r["client_id"]) for r in fits if r["accepted"]) == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    refused = [r for r in fits if not r["accepted"]]
    assert [(r["round"], r["client_id"]) for r in refused] == [(1, 2), (2, 2)]
    for row in refused:
        assert row["reason"].startswith("client failed: ") and "seed-pool directions differ" in row["reason"]
        assert "fingerprint" in row["reason"]
    logged = [m for m in caplog.messages if "update of client 2 rejected" in m]
    assert len(logged) == 2 and all("fingerprint" in m for m in logged)

    experiment = build_experiment(cfg)
    initial = experiment.initial_state()["prompt.embeddings"].clone()
    experiment.clients[2].rule = KSeedRule(kseed_setup(other))
    expected = run_in_process(experiment, cfg)
    assert not torch.equal(expected.final_state["prompt.embeddings"], initial)
    assert torch.equal(result.final_state["prompt.embeddings"], expected.final_state["prompt.embeddings"])
