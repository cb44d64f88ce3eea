"""Server strategies checked exactly against hand computations on small tensors."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedprompt.config import (
    FedAvgConfig,
    FedOptConfig,
    FedProxConfig,
    KrumConfig,
    MedianConfig,
    RunConfig,
    TrimmedMeanConfig,
)
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fedavg import FedAvg, FedProx
from fedprompt.federation.strategies.fedopt import FedOpt, FedOptVariant
from fedprompt.federation.strategies.geometric_median import GeometricMedian
from fedprompt.federation.strategies.registry import build_strategy
from fedprompt.federation.strategies.robust import CoordinateMedian, Krum, TrimmedMean


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def upd(client_id: int, num_examples: int, *values: float) -> Update:
    """An update with a single tensor named 'p'."""
    return Update(client_id=client_id, state={"p": t(*values)}, num_examples=num_examples)


def assert_state(out: State, expected: dict[str, list[float]]) -> None:
    """Bit-exact: same names in the same order, float32 on CPU, same values."""
    assert list(out) == list(expected)
    for name, values in expected.items():
        assert out[name].dtype == torch.float32
        assert out[name].device.type == "cpu"
        assert torch.equal(out[name], torch.tensor(values, dtype=torch.float32)), (name, out[name], values)


# --------------------------------------------------------------------------- FedAvg / FedProx


def test_fedavg_is_example_weighted() -> None:
    out = FedAvg().aggregate({"p": t(0, 0)}, [upd(0, 1, 1, 2), upd(1, 3, 3, 6)])
    assert_state(out, {"p": [2.5, 5.0]})


def test_fedavg_keeps_names_order_and_shapes() -> None:
    glob = {"b": torch.zeros(2, 2), "a": torch.zeros(3)}
    u1 = Update(0, {"a": t(1, 1, 1), "b": torch.tensor([[0.0, 4.0], [8.0, 2.0]])}, 3)
    u2 = Update(1, {"b": torch.tensor([[4.0, 0.0], [0.0, 6.0]]), "a": t(5, 9, -3)}, 1)
    out = FedAvg().aggregate(glob, [u1, u2])
    assert list(out) == ["b", "a"]
    assert out["b"].shape == (2, 2)
    assert torch.equal(out["b"], torch.tensor([[1.0, 3.0], [6.0, 3.0]]))
    assert torch.equal(out["a"], t(2, 3, 0))


def test_fedavg_does_not_alias_or_modify_inputs() -> None:
    u = upd(0, 1, 1, 2)
    out = FedAvg().aggregate({"p": t(0, 0)}, [u])
    out["p"] += 1
    assert torch.equal(u.state["p"], t(1, 2))


def test_fedprox_aggregates_like_fedavg_and_configures_clients() -> None:
    updates = [upd(0, 1, 1, 2), upd(1, 3, 3, 6)]
    prox = FedProx(mu=0.25)
    assert_state(prox.aggregate({"p": t(0, 0)}, updates), {"p": [2.5, 5.0]})
    assert prox.client_config() == {"proximal_mu": 0.25}
    assert FedAvg().client_config() == {}


def test_fedprox_rejects_negative_mu() -> None:
    with pytest.raises(ValueError, match="mu must be >= 0"):
        FedProx(mu=-0.1)


# --------------------------------------------------------------------------- FedOpt
# Hyperparameters eta=1, beta1=0.5, beta2=0.75 keep every m and v dyadic, so float32 holds them
# exactly. Round one in all scenarios: global [0, 0], clients [4, 0] (n=1) and [0, -4] (n=3),
# so Δ1 = ([4, 0] + 3·[0, -4]) / 4 = [1, -3] and m1 = 0.5·Δ1 = [0.5, -1.5].

ROUND_ONE = [upd(0, 1, 4, 0), upd(1, 3, 0, -4)]


def fedopt(variant: FedOptVariant, tau: float) -> FedOpt:
    return FedOpt(variant, server_lr=1.0, beta1=0.5, beta2=0.75, tau=tau)


def test_fedadam_two_rounds() -> None:
    s = fedopt("adam", tau=0.5)
    # v1 = 0.25·Δ1² = [0.25, 2.25]; θ1 = m1 / (√v1 + 0.5) = [0.5/1, -1.5/2]
    g1 = s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    assert_state(g1, {"p": [0.5, -0.75]})
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [0.25, 2.25]})
    # clients θ1 + [2, 0] (n=1) and θ1 + [0, -2] (n=3): Δ2 = [0.5, -1.5]
    # m2 = 0.5·m1 + 0.5·Δ2 = [0.5, -1.5]; v2 = 0.75·v1 + 0.25·Δ2² = [0.25, 2.25]
    # θ2 = θ1 + m2 / (√v2 + 0.5) = [0.5 + 0.5, -0.75 - 0.75]
    g2 = s.aggregate(g1, [upd(0, 1, 2.5, -0.75), upd(1, 3, 0.5, -2.75)])
    assert_state(g2, {"p": [1.0, -1.5]})
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [0.25, 2.25]})


def test_fedyogi_two_rounds() -> None:
    s = fedopt("yogi", tau=0.5)
    # v0 = 0 < Δ1², so v1 = 0 + 0.25·Δ1² = [0.25, 2.25], the same first step as Adam
    g1 = s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    assert_state(g1, {"p": [0.5, -0.75]})
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [0.25, 2.25]})
    # clients θ1 + [3, 1] (n=1) and θ1 + [0, 1] (n=3): Δ2 = [0.75, 1]
    # sign(v1 - Δ2²) = sign([0.25 - 0.5625, 2.25 - 1]) = [-1, +1]
    # v2 = [0.25 + 0.25·0.5625, 2.25 - 0.25·1] = [0.390625, 2]   (Adam would give [0.328125, 1.9375])
    # m2 = 0.5·m1 + 0.5·Δ2 = [0.625, -0.25]
    g2 = s.aggregate(g1, [upd(0, 1, 3.5, 0.25), upd(1, 3, 0.5, 0.25)])
    assert_state(g2, {"p": [0.5 + 0.625 / (0.625 + 0.5), -0.75 - 0.25 / (math.sqrt(2) + 0.5)]})
    assert_state(s.state_dict(), {"m/p": [0.625, -0.25], "v/p": [0.390625, 2.0]})


def test_fedyogi_keeps_v_when_it_equals_the_squared_step() -> None:
    s = fedopt("yogi", tau=0.5)
    g1 = s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    # Δ2 = [0.5, -1.5], so Δ2² = v1 and sign(v1 - Δ2²) = 0: v stays [0.25, 2.25]
    s.aggregate(g1, [upd(0, 1, 2.5, -0.75), upd(1, 3, 0.5, -2.75)])
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [0.25, 2.25]})


def test_fedadagrad_two_rounds() -> None:
    s = fedopt("adagrad", tau=1.0)
    # v1 = Δ1² = [1, 9]; θ1 = m1 / (√v1 + 1) = [0.5/2, -1.5/4]
    g1 = s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    assert_state(g1, {"p": [0.25, -0.375]})
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [1.0, 9.0]})
    # clients θ1 + [3, 4] (n=1) and θ1 + [0, 4] (n=3): Δ2 = [0.75, 4]
    # m2 = [0.25 + 0.375, -0.75 + 2] = [0.625, 1.25]; v2 = v1 + Δ2² = [1.5625, 25]
    g2 = s.aggregate(g1, [upd(0, 1, 3.25, 3.625), upd(1, 3, 0.25, 3.625)])
    assert_state(g2, {"p": [0.25 + 0.625 / (1.25 + 1), -0.375 + 1.25 / (5 + 1)]})
    assert_state(s.state_dict(), {"m/p": [0.625, 1.25], "v/p": [1.5625, 25.0]})


def test_fedadagrad_ignores_beta2() -> None:
    a = FedOpt("adagrad", server_lr=1.0, beta1=0.5, beta2=0.0, tau=1.0)
    b = FedOpt("adagrad", server_lr=1.0, beta1=0.5, beta2=0.9, tau=1.0)
    glob = {"p": t(0, 0)}
    assert torch.equal(a.aggregate(glob, ROUND_ONE)["p"], b.aggregate(glob, ROUND_ONE)["p"])


def test_fedadam_default_hyperparameters_one_round() -> None:
    s = FedOpt("adam")  # eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3, no bias correction
    out = s.aggregate({"p": t(1, 1)}, [upd(0, 1, 3, 1), upd(1, 1, 1, 1)])
    # Δ = [1, 0]; m = [0.1, 0]; v = [0.01, 0]; θ = 1 + 0.01·0.1 / (0.1 + 0.001) on the first coordinate
    assert_state(out, {"p": [1 + 0.01 * 0.1 / (0.1 + 0.001), 1.0]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "sgd"}, "variant must be one of"),
        ({"server_lr": 0.0}, "server_lr must be > 0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"tau": 0.0}, "tau must be > 0"),
    ],
)
def test_fedopt_rejects_bad_hyperparameters(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FedOpt(**kwargs)  # type: ignore[arg-type]


def test_fedopt_state_dict_is_empty_before_the_first_round() -> None:
    assert FedOpt().state_dict() == {}


def test_fedopt_state_dict_returns_copies() -> None:
    s = fedopt("adam", tau=0.5)
    s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    s.state_dict()["m/p"].zero_()
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [0.25, 2.25]})


def random_round(generator: torch.Generator, glob: State, ids: list[int]) -> list[Update]:
    return [
        Update(
            cid,
            {name: g + torch.randn(g.shape, generator=generator) for name, g in glob.items()},
            int(torch.randint(1, 50, (1,), generator=generator)),
        )
        for cid in ids
    ]


@pytest.mark.parametrize("variant", ["adam", "yogi", "adagrad"])
def test_fedopt_checkpoint_round_trip_gives_identical_next_rounds(variant: FedOptVariant) -> None:
    generator = torch.Generator().manual_seed(7)
    glob = {
        "prompt.embeddings": torch.randn(4, 3, generator=generator),
        "head": torch.randn(5, generator=generator),
    }
    rounds: list[list[Update]] = []
    g = glob
    reference = FedOpt(variant, server_lr=0.1)
    results = []
    for _ in range(4):
        rounds.append(random_round(generator, g, [3, 1, 2]))
        g = reference.aggregate(g, rounds[-1])
        results.append(g)

    first = FedOpt(variant, server_lr=0.1)
    g = glob
    for updates in rounds[:2]:
        g = first.aggregate(g, updates)
    checkpoint = load_safetensors(save_safetensors(first.state_dict()))
    resumed = FedOpt(variant, server_lr=0.1)
    resumed.load_state_dict(checkpoint)
    for updates, expected in zip(rounds[2:], results[2:], strict=True):
        g = resumed.aggregate(g, updates)
        for name in glob:
            assert torch.equal(g[name], expected[name])
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value)


def test_fedopt_load_empty_state_resets_the_moments() -> None:
    s = fedopt("adam", tau=0.5)
    s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    s.load_state_dict({})
    assert s.state_dict() == {}
    assert_state(s.aggregate({"p": t(0, 0)}, ROUND_ONE), {"p": [0.5, -0.75]})


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"p": torch.zeros(2)}, "not of the form 'm/<tensor>'"),
        ({"x/p": torch.zeros(2)}, "not of the form 'm/<tensor>'"),
        ({"m/": torch.zeros(2)}, "not of the form 'm/<tensor>'"),
        ({"m/p": torch.zeros(2)}, r"only m/: \['p'\]"),
        ({"m/p": torch.zeros(2), "v/q": torch.zeros(2)}, r"only m/: \['p'\], only v/: \['q'\]"),
        ({"m/p": torch.zeros(2), "v/p": torch.zeros(3)}, r"m/p of shape \(2,\) but v/p of shape \(3,\)"),
        ({"m/p": torch.zeros(2, dtype=torch.float64), "v/p": torch.zeros(2)}, "dtype torch.float64"),
        ({"m/p": t(0, math.nan), "v/p": torch.zeros(2)}, "non-finite"),
        ({"m/p": torch.zeros(2), "v/p": t(1, -1)}, "negative"),
    ],
)
def test_fedopt_load_state_dict_rejects_mismatches(state: State, match: str) -> None:
    s = fedopt("adam", tau=0.5)
    s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    before = s.state_dict()
    with pytest.raises(ValueError, match=match):
        s.load_state_dict(state)
    for key, value in s.state_dict().items():  # a failed load leaves the moments alone
        assert torch.equal(value, before[key])


def test_fedopt_rejects_moments_for_other_tensors() -> None:
    s = fedopt("adam", tau=0.5)
    s.load_state_dict({"m/q": torch.zeros(2), "v/q": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"moments are for tensors \['q'\].*global state has \['p'\]"):
        s.aggregate({"p": t(0, 0)}, ROUND_ONE)


def test_fedopt_rejects_moments_of_another_shape() -> None:
    s = fedopt("adam", tau=0.5)
    s.load_state_dict({"m/p": torch.zeros(3), "v/p": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"moment for 'p' has shape \(3,\).*is \(2,\)"):
        s.aggregate({"p": t(0, 0)}, ROUND_ONE)


@pytest.mark.parametrize("make", [FedAvg, CoordinateMedian, lambda: TrimmedMean(0.1), Krum])
def test_stateless_strategies_reject_server_state(make: Callable[[], Strategy]) -> None:
    strategy = make()
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no server state"):
        strategy.load_state_dict({"m/p": torch.zeros(2)})


# --------------------------------------------------------------------------- robust rules


def test_median_odd_count() -> None:
    updates = [upd(0, 1, 1, -7), upd(1, 100, 5, 0), upd(2, 1, 3, 100)]
    assert_state(CoordinateMedian().aggregate({"p": t(0, 0)}, updates), {"p": [3.0, 0.0]})


def test_median_even_count_averages_the_middle_two() -> None:
    updates = [upd(0, 1, 1, 0), upd(1, 1, 2, 1), upd(2, 1, 10, 2), upd(3, 1, 4, 1000)]
    assert_state(CoordinateMedian().aggregate({"p": t(0, 0)}, updates), {"p": [3.0, 1.5]})


def test_robust_rules_ignore_num_examples() -> None:
    updates = [upd(0, 1000, 0), upd(1, 1, 3), upd(2, 1, 6)]
    assert_state(CoordinateMedian().aggregate({"p": t(0)}, updates), {"p": [3.0]})
    assert_state(TrimmedMean(0.0).aggregate({"p": t(0)}, updates), {"p": [3.0]})


def test_trimmed_mean_drops_outliers_per_coordinate() -> None:
    # beta=0.2 with 5 updates drops floor(1.0) = 1 value at each end of each coordinate
    updates = [upd(0, 1, 1, -100), upd(1, 1, 2, 4), upd(2, 1, 3, 5), upd(3, 1, 4, 6), upd(4, 1, 100, 7)]
    assert_state(TrimmedMean(beta=0.2).aggregate({"p": t(0, 0)}, updates), {"p": [3.0, 5.0]})


def test_trimmed_mean_rounds_the_trim_count_down() -> None:
    # beta=0.2 with 4 updates: floor(0.8) = 0, nothing is dropped
    updates = [upd(0, 1, 1), upd(1, 1, 2), upd(2, 1, 3), upd(3, 1, 10)]
    assert_state(TrimmedMean(beta=0.2).aggregate({"p": t(0)}, updates), {"p": [4.0]})


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\).*nothing would remain"):
        TrimmedMean(beta)


def test_trimmed_mean_keeps_a_value_with_the_largest_beta() -> None:
    # the largest float below 0.5 never trims everything: floor(beta·n) < n/2 for every n
    beta = 0.5 - 2**-54
    for n in range(1, 9):
        updates = [upd(i, 1, float(i)) for i in range(n)]
        middle = [(n - 1) / 2]  # the median of 0..n-1: one or two middle values remain
        assert_state(TrimmedMean(beta).aggregate({"p": t(0)}, updates), {"p": middle})


def krum_updates() -> list[Update]:
    # states a=[0,0] b=[1,0] c=[0,2] d=[1,1] e=[9,9] split over tensors 'x' and 'y'.
    # squared distances: ab 1, ac 4, ad 2, ae 162, bc 5, bd 1, be 145, cd 2, ce 130, de 128
    # with f=1, n-f-2 = 2 nearest: a 1+2=3, b 1+1=2, c 2+4=6, d 1+2=3, e 128+130=258 -> b
    points = {0: (0, 0), 1: (1, 0), 2: (0, 2), 3: (1, 1), 4: (9, 9)}
    return [Update(cid, {"x": t(x), "y": t(y)}, 1) for cid, (x, y) in points.items()]


def test_krum_picks_the_most_central_update_and_rejects_the_outlier() -> None:
    out = Krum(num_byzantine=1).aggregate({"x": t(0), "y": t(0)}, krum_updates())
    assert_state(out, {"x": [1.0], "y": [0.0]})


def test_krum_distances_span_all_tensors() -> None:
    # On 'x' alone (0 1 0 1 9) clients 0-3 all score 0 + 1 = 1 and the tie goes to client 0; on 'y'
    # alone (0 0 2 1 9) client 0 scores 0 + 1 = 1 and wins outright. Only the flattened pair picks 1.
    updates = krum_updates()
    for name in ("x", "y"):
        alone = [Update(u.client_id, {name: u.state[name]}, 1) for u in updates]
        assert_state(Krum(1).aggregate({name: t(0)}, alone), {name: [0.0]})
    assert_state(Krum(1).aggregate({"x": t(0), "y": t(0)}, updates), {"x": [1.0], "y": [0.0]})


def test_krum_breaks_ties_by_lowest_client_id() -> None:
    updates = [upd(9, 1, 5), upd(7, 1, 0), upd(4, 1, 10), upd(8, 1, 0)]
    # f=0, 2 nearest: 7 and 8 both score 0 + 25 = 25 (identical states); the lower id, 7, wins
    out = Krum(0).aggregate({"p": t(0)}, updates)
    assert_state(out, {"p": [0.0]})
    assert out["p"] is not updates[1].state["p"] and out["p"] is not updates[3].state["p"]


def test_multi_krum_averages_the_m_best_scored_updates() -> None:
    # scores (see krum_updates): b 2, a 3, d 3, c 6, e 258 -> keep b, a, d: mean of (1,0) (0,0) (1,1)
    out = Krum(num_byzantine=1, keep=3).aggregate({"x": t(0), "y": t(0)}, krum_updates())
    assert_state(out, {"x": [2 / 3], "y": [1 / 3]})
    with pytest.raises(ValueError, match="keeps 5 updates, more than n − f = 4"):
        Krum(num_byzantine=1, keep=5).aggregate({"x": t(0), "y": t(0)}, krum_updates())


def test_krum_needs_2f_plus_3_updates() -> None:
    with pytest.raises(ValueError, match=r"num_byzantine=1 needs at least 2f \+ 3 = 5 updates, got 4"):
        Krum(num_byzantine=1).aggregate({"x": t(0), "y": t(0)}, krum_updates()[:4])
    with pytest.raises(ValueError, match="at least 2f \\+ 3 = 3 updates, got 2"):
        Krum(0).aggregate({"p": t(0)}, [upd(0, 1, 0), upd(1, 1, 1)])


def test_krum_rejects_negative_num_byzantine() -> None:
    with pytest.raises(ValueError, match="num_byzantine must be >= 0"):
        Krum(num_byzantine=-1)


# --------------------------------------------------------------------------- shared behaviour

FACTORIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": lambda: FedProx(0.1),
    "fedadam": lambda: FedOpt("adam", server_lr=0.1),
    "fedyogi": lambda: FedOpt("yogi", server_lr=0.1),
    "fedadagrad": lambda: FedOpt("adagrad", server_lr=0.1),
    "median": CoordinateMedian,
    "trimmed-mean": lambda: TrimmedMean(0.2),
    "krum": lambda: Krum(1),
}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_results_do_not_depend_on_update_order(kind: str) -> None:
    generator = torch.Generator().manual_seed(3)
    glob = {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(6, generator=generator)}
    rounds = [random_round(generator, glob, [5, 2, 8, 0, 6, 1]) for _ in range(2)]
    in_order, shuffled = FACTORIES[kind](), FACTORIES[kind]()
    g1 = g2 = glob
    rng = random.Random(0)
    for updates in rounds:
        g1 = in_order.aggregate(g1, updates)
        g2 = shuffled.aggregate(g2, rng.sample(updates, len(updates)))
        assert list(g1) == list(g2) == ["a", "b"]
        for name in glob:
            assert g1[name].shape == glob[name].shape
            assert torch.equal(g1[name], g2[name])


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_empty_updates_are_rejected(kind: str) -> None:
    with pytest.raises(ValueError, match="at least one update"):
        FACTORIES[kind]().aggregate({"p": t(0)}, [])


def test_mismatched_names_are_rejected() -> None:
    bad = Update(1, {"q": t(0, 0)}, 1)
    with pytest.raises(ValueError, match=r"client 1 has tensors \['q'\], expected \['p'\]"):
        FedAvg().aggregate({"p": t(0, 0)}, [upd(0, 1, 1, 1), bad])


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"client 1 has 'p' of shape \(1,\), expected \(2,\)"):
        FedAvg().aggregate({"p": t(0, 0)}, [upd(0, 1, 1, 1), upd(1, 1, 5)])


@pytest.mark.parametrize("num_examples", [0, -3])
def test_bad_num_examples_are_rejected(num_examples: int) -> None:
    with pytest.raises(ValueError, match=f"client 1 has num_examples={num_examples}, expected a positive"):
        FedAvg().aggregate({"p": t(0)}, [upd(0, 1, 1), upd(1, num_examples, 2)])


def test_duplicate_client_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="client 4 sent more than one update"):
        FedAvg().aggregate({"p": t(0)}, [upd(4, 1, 1), upd(4, 1, 2)])


def test_a_rejected_round_leaves_fedopt_moments_alone() -> None:
    s = fedopt("adam", tau=0.5)
    s.aggregate({"p": t(0, 0)}, ROUND_ONE)
    with pytest.raises(ValueError, match="num_examples=0"):
        s.aggregate({"p": t(0, 0)}, [upd(0, 0, 1, 1)])
    assert_state(s.state_dict(), {"m/p": [0.5, -1.5], "v/p": [0.25, 2.25]})


# --------------------------------------------------------------------------- geometric median (RFA)


def test_geometric_median_is_the_fermat_point_of_a_triangle() -> None:
    # an equilateral triangle's geometric median is its centre (every angle is below 120 degrees)
    corners = [upd(0, 1, 0, 0), upd(1, 1, 2, 0), upd(2, 1, 1, math.sqrt(3))]
    out = GeometricMedian(iterations=2000, ftol=0).aggregate({"p": t(0, 0)}, corners)
    torch.testing.assert_close(out["p"], t(1, math.sqrt(3) / 3), rtol=0, atol=1e-5)


def test_geometric_median_weights_by_examples_unless_uniform() -> None:
    # two points: the heavier one is the minimiser of 3·|v − 0| + 1·|v − 5|
    pair = [upd(0, 3, 0.0), upd(1, 1, 5.0)]
    assert abs(GeometricMedian().aggregate({"p": t(0)}, pair)["p"].item()) < 1e-4
    middle = GeometricMedian(weighting="uniform").aggregate({"p": t(0)}, pair)["p"].item()
    assert 0 <= middle <= 5  # equal weights: every point between them minimises the sum


def test_geometric_median_stays_with_the_majority_whatever_the_outliers_send() -> None:
    generator = torch.Generator().manual_seed(0)
    honest = [Update(i, {"p": t(1, 1) + 0.1 * torch.randn(2, generator=generator)}, 10) for i in range(6)]
    outliers = [upd(6 + i, 10, 1e6, -1e6) for i in range(4)]
    centre = torch.stack([u.state["p"] for u in honest]).mean(0)
    robust = GeometricMedian().aggregate({"p": t(0, 0)}, honest + outliers)["p"]
    mean = FedAvg().aggregate({"p": t(0, 0)}, honest + outliers)["p"]
    assert (robust - centre).norm() < 0.5 and (mean - centre).norm() > 1e5


# --------------------------------------------------------------------------- build_strategy


def test_build_strategy_for_every_kind() -> None:
    assert type(build_strategy(FedAvgConfig())) is FedAvg
    prox = build_strategy(FedProxConfig(mu=0.5))
    assert isinstance(prox, FedProx) and prox.client_config() == {"proximal_mu": 0.5}
    for kind, variant in [("fedadam", "adam"), ("fedyogi", "yogi"), ("fedadagrad", "adagrad")]:
        opt = build_strategy(FedOptConfig(kind=kind, server_lr=0.5, beta1=0.8, beta2=0.9, tau=0.01))
        assert isinstance(opt, FedOpt)
        assert (opt.variant, opt.server_lr, opt.beta1, opt.beta2, opt.tau) == (variant, 0.5, 0.8, 0.9, 0.01)
    assert type(build_strategy(MedianConfig())) is CoordinateMedian
    trimmed = build_strategy(TrimmedMeanConfig(beta=0.25))
    assert isinstance(trimmed, TrimmedMean) and trimmed.beta == 0.25
    krum = build_strategy(KrumConfig(num_byzantine=2))
    assert isinstance(krum, Krum) and krum.num_byzantine == 2


def test_build_strategy_covers_the_whole_config_union() -> None:
    kinds = [
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "median",
        "trimmed-mean",
        "krum",
        "geometric-median",
        "reliability",
    ]
    for kind in kinds:
        raw = {"strategy": {"kind": kind}, "federation": {"min_clients": 3}}
        config = RunConfig.model_validate(raw).strategy
        assert isinstance(build_strategy(config), Strategy)


def test_build_strategy_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="not a strategy configuration"):
        build_strategy(RunConfig())  # type: ignore[arg-type]


def test_fedavg_uniform_weighting_counts_each_client_once() -> None:
    updates = [upd(0, 1, 1, 2), upd(1, 3, 3, 6)]  # 1 and 3 examples
    assert_state(FedAvg(weighting="uniform").aggregate({"p": t(0, 0)}, updates), {"p": [2.0, 4.0]})
    assert_state(FedAvg(weighting="examples").aggregate({"p": t(0, 0)}, updates), {"p": [2.5, 5.0]})
    with pytest.raises(ValueError, match="weighting must be one of"):
        FedAvg(weighting="clients")  # type: ignore[arg-type]


def test_fedavg_weighting_comes_from_config() -> None:
    from fedprompt.config import FedAvgConfig
    from fedprompt.federation.strategies.registry import build_strategy

    assert FedAvgConfig().weighting == "examples"  # FedAvg's own rule stays the default
    strategy = build_strategy(FedAvgConfig(weighting="uniform"))
    assert isinstance(strategy, FedAvg) and strategy.weighting == "uniform"
