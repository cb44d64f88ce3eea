"""Property-based attacks on the server's receive-and-aggregate path: whatever bytes and claims
clients send, nothing raises out of a round and the global prompt stays finite."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fedprompt.federation.payload import CLIENT_ID_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from fedprompt.federation.server import RoundRecord, Server
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.federation.strategies.fedbpt import FedBPT
from fedprompt.federation.strategies.fedopt import FedOpt
from fedprompt.federation.strategies.robust import CoordinateMedian, Krum, TrimmedMean
from fedprompt.federation.update_pipeline import ExampleBounds

GLOBAL = {"prompt": torch.tensor([[0.5, -0.25, 1.0], [0.0, 2.0, -1.0]])}
FEDBPT_GLOBAL = {"z": torch.zeros(6)}

STRATEGIES = {
    "fedavg": lambda: FedAvg(),
    "fedadam": lambda: FedOpt("adam", server_lr=0.5),
    "fedadagrad": lambda: FedOpt("adagrad", server_lr=1.0),
    "median": lambda: CoordinateMedian(),
    "trimmed-mean": lambda: TrimmedMean(0.2),
    "krum": lambda: Krum(num_byzantine=0),
}

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 1e30, -1e30]),
)
metric_values = st.one_of(
    floats.map(float), st.integers(-(10**30), 10**30), st.text(max_size=5), st.booleans()
)
metric_names = st.one_of(
    st.sampled_from(["train_loss", "val_accuracy", "steps", "round", "client_id", "accepted", "queries"]),
    st.text(max_size=80),
)
counts = st.one_of(
    st.integers(-5, 10**25).map(str),
    st.sampled_from(["", "1e3", "ten", "9" * 30, "0", "00012"]),
)


@st.composite
def payloads(draw, client_id: int, like: dict[str, torch.Tensor]) -> bytes:
    """A client's uplink: usually well-formed with hostile values, sometimes malformed."""
    kind = draw(st.sampled_from(["values", "values", "values", "shape", "dtype", "names", "garbage"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    tensors = {}
    for name, tensor in like.items():
        shape = tuple(tensor.shape)
        if kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        values = draw(st.lists(floats, min_size=math.prod(shape), max_size=math.prod(shape)))
        dtype = (
            draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int32])) if kind == "dtype" else None
        )
        value = torch.tensor(values, dtype=torch.float32).reshape(shape)
        tensors[name if kind != "names" else name + draw(st.text(max_size=3))] = value.to(
            dtype or torch.float32
        )
    metrics = draw(st.dictionaries(metric_names, metric_values, max_size=6))
    metadata = {
        CLIENT_ID_KEY: draw(st.sampled_from([str(client_id), str(client_id), "7", "-1"])),
        NUM_EXAMPLES_KEY: draw(counts),
        METRICS_KEY: json.dumps(metrics, default=str),
    }
    return save(tensors, metadata=metadata)


def _server(strategy, like) -> Server:
    return Server(
        like,
        strategy,
        range(5),
        fraction=1.0,
        min_clients=1,
        seed=0,
        wire_dtype="float32",
        max_bytes=4096,
        example_bounds=ExampleBounds(known=dict.fromkeys(range(5), 100)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("kind", sorted(STRATEGIES))
@given(data=st.data())
def test_no_uplink_ends_a_round_or_makes_the_prompt_non_finite(kind, data):
    server = _server(STRATEGIES[kind](), GLOBAL)
    for round_num in (1, 2):
        record = RoundRecord(round_num, list(range(5)))
        for cid in range(5):
            server.receive(record, cid, data.draw(payloads(cid, GLOBAL)))
        server.aggregate(record)
        assert all(bool(torch.isfinite(t).all()) for t in server.global_state.values())
        assert all(
            bool(torch.isfinite(t).all())
            for t in server.strategy.state_dict().values()
            if t.is_floating_point()
        )
        for update in record.accepted:
            assert 1 <= update.num_examples <= 100
            assert all(0 <= v <= 1 for k, v in update.metrics.items() if k.endswith("accuracy"))
        tensors, metadata = server.checkpoint()
        fresh = _server(STRATEGIES[kind](), GLOBAL)
        fresh.restore(tensors, metadata)  # every checkpoint the server writes, it can resume from


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fedbpt_survives_any_search_report(data):
    server = _server(FedBPT(initial_sigma=1.0, sigma_floor=0.5), FEDBPT_GLOBAL)
    for round_num in (1, 2):
        record = RoundRecord(round_num, list(range(5)))
        for cid in range(5):
            tensors = {"z": torch.tensor(data.draw(st.lists(floats, min_size=6, max_size=6)))}
            for name in ("loss", "sigma_sq_sum", "parents", "final_sigma"):
                tensors[f"extra/{name}"] = torch.tensor([data.draw(floats)])
            metadata = {CLIENT_ID_KEY: str(cid), NUM_EXAMPLES_KEY: "10", METRICS_KEY: "{}"}
            server.receive(record, cid, save(tensors, metadata=metadata))
        server.aggregate(record)
        assert bool(torch.isfinite(server.global_state["z"]).all())
        assert math.isfinite(float(server.strategy.downlink_extras()["sigma"][0]))
