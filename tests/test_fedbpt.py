"""FedBPT aggregation: exact rules on hand-made updates, the bytes it sends, rejection, resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedprompt.config import FedBPTConfig
from fedprompt.payload import decode_state, encode_update
from fedprompt.server import RoundRecord, Server
from fedprompt.state import Update, unpack
from fedprompt.strategies import FedBPT, build_strategy
from fedprompt.strategies.fedbpt import UPLINK_EXTRAS, global_sigma
from optimizers.cma_update import CMAState, cma_tell

NAME = "prompt.z"


def update(cid: int, z: list[float], loss: float, sq_sum: float = 2.0, parents: float = 2.0, final=0.8, n=10):
    extras = {"loss": loss, "sigma_sq_sum": sq_sum, "parents": parents, "final_sigma": final}
    tensors = {k: torch.tensor([float(v)]) for k, v in extras.items()}
    return Update(cid, {NAME: torch.tensor(z)}, n, {}, tensors)


def test_global_sigma_is_the_references_formula():
    # reference: sqrt(Σ_k Σ_t σ_kt² / m / μ); clients report S_k = Σ_t σ_kt²
    sums, parents = torch.tensor([2.0, 4.0, 6.0]), torch.tensor([2.0, 2.0, 2.0])
    assert global_sigma(sums, parents) == pytest.approx(math.sqrt(12.0 / 3 / 2))
    assert global_sigma(torch.tensor([2.0, 6.0]), torch.tensor([1.0, 3.0])) == pytest.approx(math.sqrt(2.0))


def test_cma_rule_tells_the_client_means_from_the_clients_sigma():
    strategy = FedBPT(initial_sigma=1.0, sigma_floor=0.5)
    assert strategy.downlink_extras()["sigma"].tolist() == [1.0]
    updates = [
        update(0, [1.0, 0.0], 0.9, 2.0),
        update(1, [0.0, 2.0], 0.3, 4.0),
        update(2, [2.0, 2.0], 0.5, 6.0),
    ]
    new = strategy.aggregate({NAME: torch.zeros(2)}, updates)

    before = math.sqrt((2.0 + 4.0 + 6.0) / 3 / 2)
    expected = cma_tell(
        CMAState.initial(torch.zeros(2), before),
        torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]]),
        torch.tensor([0.9, 0.3, 0.5]),
    )
    torch.testing.assert_close(new[NAME], expected.mean.float())
    assert strategy.sigma == pytest.approx(max(0.5, 1.0 * min(1.0, expected.sigma / before)))
    assert strategy.downlink_extras()["sigma"].item() == pytest.approx(strategy.sigma)


def test_sigma_sent_down_never_grows_and_stops_at_the_floor():
    strategy = FedBPT(initial_sigma=0.6, sigma_floor=0.5)
    z = torch.zeros(3)
    sigmas = []
    for _ in range(30):  # clients that never move: the global CMA-ES shrinks its step every round
        new = strategy.aggregate({NAME: z}, [update(0, z.tolist(), 0.5), update(1, z.tolist(), 0.4)])
        z = new[NAME]
        sigmas.append(strategy.sigma)
    assert all(b <= a for a, b in itertools.pairwise(sigmas))
    assert sigmas[0] < 0.6 and sigmas[-1] == 0.5
    spread = FedBPT(initial_sigma=1.0, sigma_floor=0.5)
    far = [update(0, [50.0, -50.0, 50.0], 0.1), update(1, [-50.0, 50.0, 50.0], 0.2)]
    spread.aggregate({NAME: torch.zeros(3)}, far)  # a large step would grow CMA-ES's σ: capped at the old
    assert spread.sigma == 1.0


def test_mean_rule_is_the_example_weighted_mean():
    strategy = FedBPT(initial_sigma=1.0, sigma_floor=0.5, rule="mean")
    updates = [update(0, [1.0, 2.0], 0.9, final=0.9, n=1), update(1, [4.0, -1.0], 0.1, final=0.6, n=3)]
    new = strategy.aggregate({NAME: torch.zeros(2)}, updates)
    torch.testing.assert_close(new[NAME], torch.tensor([(1 + 12) / 4, (2 - 3) / 4]))
    assert strategy.sigma == pytest.approx(math.sqrt((0.81 + 3 * 0.36) / 4))
    assert not any(k.startswith("cma/") for k in strategy.state_dict())


def test_resume_from_state_dict_continues_identically():
    rounds = [
        [update(0, [1.0, 0.5, 0.0], 0.7), update(3, [0.2, -0.4, 1.0], 0.6, 3.0)],
        [update(0, [1.5, 0.0, 0.3], 0.5), update(3, [0.0, 0.1, 0.9], 0.55, 1.0)],
    ]
    straight = FedBPT(initial_sigma=1.0, sigma_floor=0.5)
    state = {NAME: torch.zeros(3)}
    state = straight.aggregate(state, rounds[0])
    saved = {k: v.clone() for k, v in straight.state_dict().items()}
    final = straight.aggregate(state, rounds[1])

    resumed = FedBPT(initial_sigma=1.0, sigma_floor=0.5)
    resumed.load_state_dict(saved)
    again = resumed.aggregate(state, rounds[1])
    assert torch.equal(final[NAME], again[NAME]) and resumed.sigma == straight.sigma
    other = FedBPT(initial_sigma=1.0)
    other.load_state_dict(saved)
    with pytest.raises(ValueError, match="differs from the global prompt state"):
        other.aggregate({NAME: torch.ones(3)}, rounds[1])


def test_load_state_dict_rejects_bad_state():
    strategy = FedBPT(initial_sigma=1.0, sigma_floor=0.5)
    with pytest.raises(ValueError, match=r"sigma is 0\.1, expected a number >= sigma_floor 0\.5"):
        strategy.load_state_dict({"sigma": torch.tensor([0.1], dtype=torch.float64)})
    with pytest.raises(ValueError, match="expected 'sigma'"):
        strategy.load_state_dict({"m/x": torch.zeros(1)})
    mean_rule = FedBPT(initial_sigma=1.0, rule="mean")
    cma_state = {f"cma/{k}": v for k, v in CMAState.initial(torch.zeros(2), 1.0).to_tensors().items()}
    with pytest.raises(ValueError, match="rule is 'mean'"):
        mean_rule.load_state_dict({"sigma": torch.tensor([1.0], dtype=torch.float64), **cma_state})
    strategy.load_state_dict({})
    assert strategy.sigma == 1.0


def test_fedbpt_searches_one_vector_and_checks_its_settings():
    with pytest.raises(ValueError, match="one vector"):
        matrix = update(0, [0.0], 0.5)
        matrix.state = {"a": torch.zeros(2, 2)}
        FedBPT(1.0).aggregate({"a": torch.zeros(2, 2)}, [matrix])
    with pytest.raises(ValueError, match=r"sigma_floor .* exceeds initial_sigma"):
        FedBPT(initial_sigma=0.4, sigma_floor=0.5)
    with pytest.raises(ValueError, match="needs search_sigma"):
        build_strategy(FedBPTConfig())
    assert isinstance(build_strategy(FedBPTConfig(rule="mean"), search_sigma=2.0), FedBPT)


def _server(dim: int) -> Server:
    return Server(
        {NAME: torch.zeros(dim)},
        FedBPT(initial_sigma=1.0),
        [0, 1, 2],
        fraction=1.0,
        min_clients=1,
        seed=0,
        wire_dtype="float32",
        max_bytes=2**20,
    )


def test_bytes_down_at_d_500_are_d_floats_plus_sigma_and_counted():
    server = _server(500)
    payload = server.downlink(1, 0)
    assert len(payload) < 4096  # the reference pickles a CMA-ES object of over 1 MB
    assert len(payload) >= 501 * 4
    assert server.bytes.per_client(1) == {0: {"up": 0, "down": len(payload)}}
    tensors, _ = decode_state(payload, server.downlink_spec)
    state, extras = unpack(tensors)
    assert set(state) == {NAME} and set(extras) == {"sigma"} and extras["sigma"].tolist() == [1.0]


def test_a_bad_search_report_is_rejected_and_the_round_goes_on():
    server = _server(4)
    record = RoundRecord(1, [0, 1, 2])
    good = update(0, [0.1, 0.2, 0.3, 0.4], 0.5)
    server.receive(record, 0, encode_update(good, "float32"))
    server.receive(record, 1, encode_update(update(1, [0.0] * 4, -1.0), "float32"))
    server.receive(record, 2, encode_update(update(2, [0.0] * 4, 0.2, parents=1.5), "float32"))
    assert [u.client_id for u in record.accepted] == [0]
    assert "loss is -1.0" in record.rejected[1] and "parents is 1.5" in record.rejected[2]
    missing = Update(1, {NAME: torch.zeros(4)}, 5, {}, {})
    server.receive(record, 1, encode_update(missing, "float32"))
    assert all(f"extra/{name}" in record.rejected[1] for name in UPLINK_EXTRAS)
    server.aggregate(record)
    assert server.completed_rounds == 1 and server.global_state[NAME].shape == (4,)
