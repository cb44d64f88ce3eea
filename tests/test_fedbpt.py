"""FedBPT aggregation: exact rules on hand-made updates, the bytes it sends, rejection, resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedprompt.config import FedBPTConfig
from fedprompt.federation.payload import decode_state, encode_update
from fedprompt.federation.server import RoundRecord, Server
from fedprompt.federation.state import Update, unpack
from fedprompt.federation.strategies.fedbpt import UPLINK_EXTRAS, FedBPT, global_sigma
from fedprompt.federation.strategies.registry import build_strategy
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
    assert strategy.sigma == pytest.approx(max(0.5, 1.0 * expected.sigma / before))
    assert strategy.downlink_extras()["sigma"].item() == pytest.approx(strategy.sigma)


def test_sigma_sent_down_scales_with_the_global_step_and_stops_at_the_floor():
    """σ_down ← max(floor, σ_down · σ_after/σ_g), the reference's rule with its floor and no cap."""
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
    steps = [[1.65, -1.65, 1.65], [-1.65, 1.65, 1.65]]  # length 2.86, inside pycma's 2.93 σ_g
    spread.aggregate({NAME: torch.zeros(3)}, [update(0, steps[0], 0.1), update(1, steps[1], 0.2)])
    told = cma_tell(CMAState.initial(torch.zeros(3), 1.0), torch.tensor(steps), torch.tensor([0.1, 0.2]))
    assert told.sigma > 1.0  # a long step grows CMA-ES's σ, and the σ sent down grows with it
    assert spread.sigma == pytest.approx(1.0 * told.sigma / 1.0)
    unfloored = FedBPT(initial_sigma=0.6, sigma_floor=0.0)
    unfloored.aggregate({NAME: torch.zeros(3)}, [update(0, [0.0] * 3, 0.5), update(1, [0.0] * 3, 0.4)])
    still = cma_tell(CMAState.initial(torch.zeros(3), 1.0), torch.zeros(2, 3), torch.tensor([0.5, 0.4]))
    assert unfloored.sigma == pytest.approx(0.6 * still.sigma / 1.0) and unfloored.sigma < 0.5  # no floor
    assert sigmas[0] == 0.5  # what the floor made of the same round


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


# ----------------------------------------------------------------------------- injected solutions


def test_injected_solutions_are_repaired_as_pycma_repairs_them():
    """pycma's repair_genotype on the same mean, σ and C (pycma's own initial C, which it perturbs
    slightly off I), and a hand computation with a skewed C: x beyond √d + 2d/(d+2) Mahalanobis
    units of the mean moves towards it to exactly that length."""
    import cma
    import numpy as np

    from optimizers.cma_update import repair_injected, repair_length

    d = 6
    mean, sigma = torch.linspace(-1.0, 1.0, d, dtype=torch.float64), 0.7
    es = cma.CMAEvolutionStrategy(mean.numpy(), sigma, {"verbose": -9, "seed": 1})
    far = mean + torch.tensor([9.0, -4.0, 0.0, 3.0, 1.0, -7.0], dtype=torch.float64)
    near = mean + 0.1
    cov = torch.from_numpy(np.asarray(es.sm.C, dtype=np.float64))
    state = CMAState(mean, sigma, cov, torch.zeros(d), torch.zeros(d), 0)
    repaired, factors = repair_injected(state, torch.stack([far, near]))
    expected = es.repair_genotype(far.numpy().copy())
    np.testing.assert_allclose(repaired[0].numpy(), expected, rtol=1e-12)
    assert torch.equal(repaired[1], near) and factors[1] == 1.0
    assert factors[0] == pytest.approx(es.mahalanobis_norm((far - mean).numpy()) / repair_length(d))

    scales = torch.tensor([4.0, 1.0, 0.25, 1.0, 9.0, 1.0], dtype=torch.float64)
    skewed = CMAState(mean, sigma, torch.diag(scales), torch.zeros(d), torch.zeros(d), 0)
    (x,), _ = repair_injected(skewed, far[None])
    length = float((((x - mean) ** 2) / scales).sum().sqrt()) / sigma
    assert length == pytest.approx(repair_length(d))
    torch.testing.assert_close((x - mean) / (x - mean).norm(), (far - mean) / (far - mean).norm())


def _attack_round(server: Server, dim: int, z: float) -> RoundRecord:
    record = RoundRecord(1, [0, 1, 2])
    honest = [update(0, [0.3] * dim, 0.6), update(1, [-0.2] * dim, 0.5)]
    attacker = update(2, [z] * dim, 0.0)  # ranks first, from a point far away
    for u in (*honest, attacker):
        server.receive(record, u.client_id, encode_update(u, "float32"))
    return record


@pytest.mark.parametrize("z", [1e30, 3e38, -1e20])
def test_a_client_claiming_loss_0_with_a_huge_z_cannot_break_or_seize_the_global_search(z, caplog):
    """Issue 11's attack: loss 0 and a z of huge norm. The old server's CMA-ES update overflowed and
    ended the run; now the injected mean is repaired to pycma's bound and the run goes on."""
    from optimizers.cma_update import recombination_weights, repair_length

    dim = 8
    server = _server(dim)
    record = _attack_round(server, dim, z)
    assert len(record.accepted) == 3  # the report itself is in range: the repair bounds it
    with caplog.at_level("WARNING", logger="fedprompt.strategies.fedbpt"):
        state = server.aggregate(record)
    assert "client 2's mean lies" in caplog.text and "repaired to the bound" in caplog.text
    assert bool(torch.isfinite(state[NAME]).all())
    assert all(bool(torch.isfinite(t).all()) for t in server.strategy.state_dict().values())
    # the attacker moved the mean by at most its weight times pycma's bound (σ_g = 1, C = I)
    bound = float(recombination_weights(3)[0]) * repair_length(dim) + 0.5
    assert float(state[NAME].norm()) <= bound
    for round_num in (2, 3):  # and the run goes on with finite state
        record = RoundRecord(round_num, [0, 1])
        for cid in (0, 1):
            report = update(cid, (state[NAME] + 0.1 * (cid + 1)).tolist(), 0.5 - 0.1 * cid)
            server.receive(record, cid, encode_update(report, "float32"))
        state = server.aggregate(record)
        assert bool(torch.isfinite(state[NAME]).all())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss": 101.0}, r"loss is 101\.0, expected a cross-entropy in \[0, 100\.0\]"),
        ({"final": 50.0}, r"final_sigma is 50, outside \[0\.1, 10\]"),
        ({"sq_sum": 1e6}, r"√\(sigma_sq_sum/parents\) is 707\.107, outside \[0\.1, 10\]"),
        ({"sq_sum": 1e-6}, r"√\(sigma_sq_sum/parents\) is 0\.000707107, outside"),
        ({"parents": 1e30, "sq_sum": 2.0}, r"outside \[0\.1, 10\]"),
    ],
)
def test_reports_out_of_range_are_rejected_with_the_bound_named(changes, message):
    strategy = FedBPT(initial_sigma=1.0)
    values = {"z": [0.0, 0.0], "loss": 0.5, **changes}
    report = update(0, values.pop("z"), values.pop("loss"), **values)
    with pytest.raises(ValueError, match=message):
        strategy.validate_update(report)
    strategy.validate_update(update(0, [0.0, 0.0], 0.5))  # an honest report passes


def test_fedbpt_never_produces_non_finite_state_from_any_finite_reports():
    """Property: any finite float32 z and any in-range report give a finite global z and state."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
    report = st.tuples(
        st.lists(finite, min_size=4, max_size=4),
        st.floats(0.0, 100.0),
        st.floats(0.11, 9.9),  # the RMS step, within max_sigma_ratio of σ = 1
        st.integers(1, 50),
    )

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(report, min_size=1, max_size=4))
    def check(reports):
        strategy = FedBPT(initial_sigma=1.0)
        updates = []
        for cid, (z, loss, rms, parents) in enumerate(reports):
            u = update(cid, z, loss, sq_sum=rms**2 * parents, parents=parents, final=1.0)
            strategy.validate_update(u)
            updates.append(u)
        new = strategy.aggregate({NAME: torch.zeros(4)}, updates)
        assert bool(torch.isfinite(new[NAME]).all())
        assert all(bool(torch.isfinite(t).all()) for t in strategy.state_dict().values())
        assert 0 < strategy.sigma < math.inf

    check()


def test_sigma_schedule_multiplies_each_rounds_sigma_before_the_floor():
    mean_rule = FedBPT(initial_sigma=1.0, sigma_floor=0.1, rule="mean", sigma_decay=0.5)
    updates = [update(0, [1.0, 2.0], 0.9, final=0.9, n=1), update(1, [4.0, -1.0], 0.1, final=0.6, n=3)]
    mean_rule.aggregate({NAME: torch.zeros(2)}, updates)
    rms = math.sqrt((0.81 + 3 * 0.36) / 4)
    assert mean_rule.sigma == pytest.approx(0.5 * rms)
    mean_rule.aggregate({NAME: torch.zeros(2)}, updates)  # min(σ, rms) is now σ: halved again
    assert mean_rule.sigma == pytest.approx(0.25 * rms)
    mean_rule.aggregate({NAME: torch.zeros(2)}, updates)
    mean_rule.aggregate({NAME: torch.zeros(2)}, updates)
    assert mean_rule.sigma == 0.1  # 0.0359… would be below the floor

    cma_rule = FedBPT(initial_sigma=1.0, sigma_floor=0.0, sigma_decay=0.8)
    steps = [update(0, [1.0, 0.0], 0.9, 2.0), update(1, [0.0, 2.0], 0.3, 4.0)]
    cma_rule.aggregate({NAME: torch.zeros(2)}, steps)
    before = math.sqrt((2.0 + 4.0) / 2 / 2)
    told = cma_tell(
        CMAState.initial(torch.zeros(2), before),
        torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        torch.tensor([0.9, 0.3]),
    )
    assert cma_rule.sigma == pytest.approx(0.8 * 1.0 * told.sigma / before)
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="sigma_decay must be in"):
            FedBPT(initial_sigma=1.0, sigma_decay=bad)
