"""The server's receive-and-aggregate path: the update pipeline (metric checks, weight bounds,
norm clipping) and a strategy that fails on a round's updates. Each attack here ended the run or
decided the global prompt on the earlier code."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedprompt.config import ConfigError, load_config
from fedprompt.errors import PayloadError
from fedprompt.federation.payload import METRICS_KEY, encode_state, encode_update
from fedprompt.federation.server import RoundRecord, Server
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.federation.strategies.fedopt import FedOpt
from fedprompt.federation.strategies.robust import Krum
from fedprompt.federation.update_pipeline import (
    ExampleBounds,
    UpdateRejected,
    check_metrics,
    clip_delta,
    delta_norm,
)

GLOBAL = {"p": torch.tensor([1.0, 2.0, 3.0])}


def _server(strategy: Strategy | None = None, **kwargs) -> Server:
    return Server(
        GLOBAL,
        strategy or FedAvg(),
        range(4),
        fraction=1.0,
        min_clients=1,
        seed=0,
        wire_dtype="float32",
        max_bytes=1 << 20,
        **kwargs,
    )


def _send(
    server: Server, record: RoundRecord, cid: int, values, num_examples: int = 10, metrics=None
) -> bool:
    update = Update(cid, {"p": torch.tensor(values, dtype=torch.float32)}, num_examples, metrics or {})
    return server.receive(record, cid, encode_update(update, "float32")) is not None


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"round": 3.0}, "names the server writes"),
        ({"client_id": 0.0}, "names the server writes"),
        ({"accepted": 1.0}, "names the server writes"),
        ({"val_accuracy": 1.5}, r"accuracy lies in \[0, 1\]"),
        ({"accuracy": -0.1}, r"accuracy lies in \[0, 1\]"),
        ({"steps": -1.0}, "never negative"),
    ],
)
def test_metrics_out_of_range_or_reserved_are_rejected(metrics, match):
    with pytest.raises(UpdateRejected, match=match):
        check_metrics(metrics)


def test_plausible_metrics_pass():
    check_metrics({"train_loss": 0.7, "val_accuracy": 1.0, "steps": 0.0, "sigma": 0.3})


def test_a_client_cannot_overwrite_its_row_or_send_unbounded_metrics():
    server = _server()
    record = RoundRecord(1, [0, 1, 2, 3])
    assert not _send(server, record, 0, [1, 2, 3], metrics={"accepted": 1.0})
    assert "names the server writes" in record.rejected[0]
    assert not _send(server, record, 1, [1, 2, 3], metrics={"local_accuracy": 7.0})
    with pytest.raises(ValueError, match="over the limit of 64"):  # the sender finds its own bug
        encode_update(Update(2, GLOBAL, 10, {f"m{i}": 0.0 for i in range(65)}), "float32")
    # a hand-made payload with many keys, a huge key, or an odd name is refused before it is kept
    many = json.dumps({f"m{i}": 0.0 for i in range(65)})
    huge = json.dumps({"m": 0.0, "x" * 9000: 1.0})
    odd = json.dumps({"Round Trip": 0.0})
    for cid, text in ((2, many), (3, huge), (3, odd)):
        raw = encode_state(
            GLOBAL,
            "float32",
            {"fedprompt.client_id": str(cid), "fedprompt.num_examples": "10", METRICS_KEY: text},
        )
        assert server.receive(record, cid, raw) is None
    assert "over the limit of 64" in record.rejected[2]
    assert "lower-case names" in record.rejected[3]
    assert record.accepted == []


def test_payload_metric_limits_are_checked_before_parsing():
    from fedprompt.federation.payload import parse_metrics

    with pytest.raises(PayloadError, match="over the limit of 8192"):
        parse_metrics('{"a": ' + "[" * 10_000 + "]" * 10_000 + "}")


# --------------------------------------------------------------------------- example counts


def test_example_bounds_clamp_to_what_the_server_knows():
    bounds = ExampleBounds(known={0: 50, 1: 40}, cap=45)
    assert bounds.bound(0) == 45 and bounds.bound(1) == 40 and bounds.bound(7) == 45
    update, claimed = bounds.apply(Update(0, GLOBAL, 10**19))
    assert update.num_examples == 45 and claimed == 10**19
    same, none = bounds.apply(Update(1, GLOBAL, 30))
    assert same.num_examples == 30 and none is None
    assert ExampleBounds().apply(Update(0, GLOBAL, 10**19))[1] is None  # no bound known: as claimed


def test_a_client_claiming_huge_counts_cannot_make_the_global_prompt_its_own():
    server = _server(example_bounds=ExampleBounds(known={0: 50, 1: 50}))
    record = RoundRecord(1, [0, 1])
    assert _send(server, record, 0, [0.0, 0.0, 0.0], num_examples=50)
    assert _send(server, record, 1, [100.0, 100.0, 100.0], num_examples=10**19)
    server.aggregate(record)
    assert record.clamped == {1: 10**19}
    assert torch.equal(server.global_state["p"], torch.tensor([50.0, 50.0, 50.0]))  # (0·50 + 100·50)/100


def test_the_library_server_bounds_a_client_of_unknown_size_by_default():
    # Today a Server given no bounds took every count as claimed: a 10^19 claim made the global
    # prompt that client's. Now a client of unknown size weighs at most 5x the round's median.
    server = _server()
    record = RoundRecord(1, [0, 1, 2])
    assert _send(server, record, 0, [0.0, 0.0, 0.0], num_examples=40)
    assert _send(server, record, 1, [0.0, 0.0, 0.0], num_examples=60)
    assert _send(server, record, 2, [70.0, 70.0, 70.0], num_examples=10**19)
    server.aggregate(record)
    assert record.clamped == {2: 10**19}
    # median_low(40, 60, 10^19) = 60, limit 300: 70·300 / (40 + 60 + 300)
    assert torch.allclose(server.global_state["p"], torch.full((3,), 70.0 * 300 / 400))


def test_known_sizes_are_trusted_and_the_relative_bound_can_be_turned_off():
    bounds = ExampleBounds(known={0: 1000, 1: 10, 2: 10})
    updates = [Update(0, GLOBAL, 1000), Update(1, GLOBAL, 10), Update(2, GLOBAL, 10)]
    assert bounds.bound_round(updates) == (updates, {})  # in-process sizes: skew is real, not claimed
    unknown, clamped = ExampleBounds().bound_round(updates)
    assert [u.num_examples for u in unknown] == [50, 10, 10] and clamped == {0: 1000}
    assert ExampleBounds(max_ratio=None).bound_round(updates) == (updates, {})
    assert ExampleBounds(declared={3: 7}, cap=5).bound(3) == 5


# --------------------------------------------------------------------------- norm bound


def test_clip_delta_is_exact():
    reference = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    update = {"a": torch.tensor([4.0, 5.0]), "b": torch.tensor([0.0])}  # delta (3, 4, 0): norm 5
    clipped, norm = clip_delta(update, reference, 2.5)
    assert norm == 5.0
    assert torch.equal(clipped["a"], torch.tensor([2.5, 3.0], dtype=torch.float64))  # 1 + 0.5·(3, 4)
    assert delta_norm(clipped, reference) == pytest.approx(2.5, rel=1e-15)
    same, _ = clip_delta(update, reference, 5.0)
    assert same is update  # within the bound: untouched


def test_the_norm_bound_limits_how_far_one_client_moves_the_prompt():
    server = _server(max_update_norm=1.0)
    record = RoundRecord(1, [0, 1])
    assert _send(server, record, 0, [1.0, 2.0, 3.0])  # no change
    assert _send(server, record, 1, [1001.0, 2.0, 3.0])  # 1000 away
    server.aggregate(record)
    assert record.norms == {0: 0.0, 1: 1000.0}
    assert torch.allclose(server.global_state["p"], torch.tensor([1.5, 2.0, 3.0]))  # (0 + 1)/2 moved


# --------------------------------------------------------------------------- failing aggregation


class Exploding(FedAvg):
    """A strategy with server state that fails half-way through a round."""

    def __init__(self) -> None:
        self.calls = torch.zeros(1)

    def _aggregate(self, global_state, updates):
        self.calls += 1
        raise ValueError("cannot aggregate this")

    def state_dict(self):
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"].clone() if state else torch.zeros(1)


def test_a_strategy_that_fails_skips_the_round_and_leaves_its_state_alone():
    strategy = Exploding()
    server = _server(strategy)
    record = RoundRecord(1, [0])
    assert _send(server, record, 0, [5.0, 5.0, 5.0])
    assert torch.equal(server.aggregate(record)["p"], GLOBAL["p"])
    assert record.aggregation_error == "ValueError: cannot aggregate this"
    assert record.used == [] and server.accepted_rounds == {}
    assert float(strategy.calls) == 0.0  # its half-made change was rolled back
    assert server.completed_rounds == 1


def test_fedopt_second_moment_overflow_skips_the_round_and_keeps_a_resumable_checkpoint():
    server = _server(FedOpt("adagrad", server_lr=1.0))
    record = RoundRecord(1, [0])
    assert _send(server, record, 0, [3e38, 2.0, 3.0])  # finite, but Δ² overflows float32
    server.aggregate(record)
    assert "non-finite" in record.aggregation_error
    tensors, metadata = server.checkpoint()
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    resumed = _server(FedOpt("adagrad", server_lr=1.0))
    resumed.restore(tensors, metadata)  # refused its own checkpoint before
    record = RoundRecord(2, [0])
    assert _send(resumed, record, 0, [2.0, 2.0, 3.0])
    resumed.aggregate(record)
    assert record.aggregation_error is None and resumed.accepted_rounds == {0: 2}


def test_krum_with_too_few_updates_skips_the_round_with_a_reason():
    server = _server(Krum(num_byzantine=1))
    record = RoundRecord(1, [0, 1, 2, 3])
    for cid in range(4):
        assert _send(server, record, cid, [float(cid), 0.0, 0.0])
    server.aggregate(record)
    assert "needs at least 2f + 3 = 5 updates, got 4" in record.aggregation_error
    assert torch.equal(server.global_state["p"], GLOBAL["p"])


def test_krum_ties_min_clients_to_its_guarantee_at_config_time():
    with pytest.raises(
        ConfigError, match=r"max\(2f \+ 3, keep \+ f\) = 5 updates a round; set federation.min_clients >= 5"
    ):
        load_config(None, ["strategy.kind=krum", "strategy.num_byzantine=1", "federation.min_clients=4"])
    assert load_config(None, ["strategy.kind=krum", "strategy.num_byzantine=1", "federation.min_clients=5"])


def test_non_finite_values_never_reach_the_global_prompt():
    class Infinite(FedAvg):
        def _aggregate(self, global_state, updates):
            return {"p": torch.tensor([math.inf, 0.0, 0.0])}

    server = _server(Infinite())
    record = RoundRecord(1, [0])
    assert _send(server, record, 0, [1.0, 1.0, 1.0])
    server.aggregate(record)
    assert "non-finite" in record.aggregation_error
    assert torch.equal(server.global_state["p"], GLOBAL["p"])
