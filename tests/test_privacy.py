"""Client-level differential privacy: the arithmetic of clipping and noise against hand
computations, the accountant against dp-accounting (and Opacus) called directly, Poisson
sampling, every refusal, and tiny private runs end to end with a bit-exact resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

import fedprompt
from fedprompt.config import AdaptiveClippingConfig, ConfigError, PrivacyConfig, load_config
from fedprompt.federation.client_rules import ClientRule, RoundInputs
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import encode_update
from fedprompt.federation.privacy.accounting import RDP_ORDERS, PrivacyPlan, plan_privacy
from fedprompt.federation.privacy.central import CentralPrivacy, PrivacyCheckFailed
from fedprompt.federation.privacy.local import LocalPrivacyAccountant, LocalPrivacyRule
from fedprompt.federation.privacy.noise import SeededNoise
from fedprompt.federation.privacy.stages import privacy_stages
from fedprompt.federation.sampling import poisson_sample_clients
from fedprompt.federation.server import RoundRecord, Server
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.seeding import derive_seed, torch_generator
from optimizers.base import OptimizationStats

from conftest import tiny_run_config, write_keyword_dataset

GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5], [-0.5]])}
SEED = 7


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _plan(**changes) -> PrivacyPlan:
    values = {
        "kind": "central",
        "clip_norm": 1.0,
        "noise_multiplier": 2.0,
        "delta": 1e-5,
        "rounds": 3,
        "population": 4,
        "expected_clients": 2.0,
        "poisson": True,
        **changes,
    }
    return PrivacyPlan(**values)


def _server(stage, robustness_bound: float | None = None) -> Server:
    return Server(
        GLOBAL,
        FedAvg(),
        range(4),
        fraction=0.5,
        min_clients=1,
        seed=SEED,
        wire_dtype="float32",
        max_bytes=1 << 20,
        max_update_norm=robustness_bound,
        stages=[stage],
        poisson_sampling=True,
    )


def _send(server: Server, record: RoundRecord, cid: int, delta_a, delta_b, num_examples: int = 10) -> None:
    state = {
        "a": server.global_state["a"] + torch.tensor(delta_a),
        "b": server.global_state["b"] + torch.tensor(delta_b),
    }
    assert server.receive(record, cid, encode_update(Update(cid, state, num_examples), "float32"))


def _noise(purpose: str, round_num: int, std: float, shapes=(("a", (2,)), ("b", (2, 1)))) -> dict:
    generator = torch_generator(derive_seed(SEED, purpose, round_num))
    return {
        name: std * torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes
    }


def _as64(state):
    return {k: v.to(torch.float64) for k, v in state.items()}


# --------------------------------------------------------------------------- central DP arithmetic


def test_central_noise_is_the_clipped_uniform_mean_plus_gaussian_noise_of_scale_sigma_c_over_k():
    plan = _plan()
    stage = CentralPrivacy(plan, robustness_bound=None, noise=SeededNoise(SEED))
    server = _server(stage)
    record = server.begin_round(1)
    assert server.max_update_norm == 1.0
    _send(server, record, 0, [0.3, 0.4], [[0.0], [0.0]], num_examples=1)  # norm 0.5: kept
    _send(server, record, 1, [3.0, 0.0], [[0.0], [4.0]], num_examples=1000)  # norm 5: scaled by 1/5
    _send(server, record, 2, [0.0, 0.0], [[0.0], [0.0]])
    assert record.norms == pytest.approx({0: 0.5, 1: 5.0, 2: 0.0})
    previous = _as64(server.global_state)
    # uniform weights (client 1's 1000 examples count as one client), fixed denominator K = 2
    mean = {"a": torch.tensor([0.3 + 0.6, 0.4]) / 2, "b": torch.tensor([[0.0], [0.8]]) / 2}
    released = stage.apply(server, record, server.global_state, server.global_state)
    noise = _noise("dp-noise", 1, std=2.0 * 1.0 / 2)
    for name in GLOBAL:
        assert torch.allclose(released[name] - previous[name] - mean[name].double(), noise[name], atol=1e-12)
    assert record.stage_metrics["noise_std"] == 1.0
    assert record.stage_metrics["epsilon"] == plan.epsilon(1)

    again = CentralPrivacy(
        plan, robustness_bound=None, noise=SeededNoise(SEED)
    )  # the stage run by the server
    server = _server(again)
    record = server.begin_round(1)
    _send(server, record, 0, [0.3, 0.4], [[0.0], [0.0]])
    _send(server, record, 1, [3.0, 0.0], [[0.0], [4.0]])
    _send(server, record, 2, [0.0, 0.0], [[0.0], [0.0]])
    server.aggregate(record)
    assert record.aggregation_error is None
    for name in GLOBAL:
        assert torch.equal(server.global_state[name], released[name].float())


def test_the_bound_in_force_is_the_smaller_of_the_robustness_and_privacy_bounds():
    server = _server(CentralPrivacy(_plan(clip_norm=1.0), robustness_bound=0.25), robustness_bound=0.25)
    server.begin_round(1)
    assert server.max_update_norm == 0.25
    server = _server(CentralPrivacy(_plan(clip_norm=0.1), robustness_bound=0.25), robustness_bound=0.25)
    server.begin_round(1)
    assert server.max_update_norm == 0.1


def test_a_round_without_clients_still_releases_noise():
    stage = CentralPrivacy(_plan(), robustness_bound=None, noise=SeededNoise(SEED))
    server = _server(stage)
    record = server.begin_round(2)
    record.sampled = []
    server.aggregate(record)
    assert record.aggregation_error is None and record.used == []
    noise = _noise("dp-noise", 2, std=1.0)
    for name in GLOBAL:
        assert torch.equal(server.global_state[name], (GLOBAL[name].double() + noise[name]).float())
    assert record.stage_metrics["epsilon"] == _plan().epsilon(2)


def test_server_momentum_steps_on_the_noised_mean():
    plan = _plan(noise_multiplier=0.5)
    stage = CentralPrivacy(
        plan, robustness_bound=None, server_lr=0.5, server_momentum=0.9, noise=SeededNoise(SEED)
    )
    server = _server(stage)
    theta = _as64(GLOBAL)
    velocity = None
    for round_num, delta in ((1, 0.2), (2, -0.1)):
        record = server.begin_round(round_num)
        _send(server, record, 0, [delta, 0.0], [[0.0], [0.0]])
        # the server's prompt is float32: the delta it measures is the float32 sum minus it
        sent = (server.global_state["a"] + torch.tensor([delta, 0.0])).double() - server.global_state[
            "a"
        ].double()
        noise = _noise("dp-noise", round_num, std=0.5 * 1.0 / 2)
        mean = {"a": sent / 2 + noise["a"], "b": torch.zeros(2, 1, dtype=torch.float64) + noise["b"]}
        velocity = mean if velocity is None else {k: 0.9 * velocity[k] + mean[k] for k in mean}
        theta = {k: server.global_state[k].double() + 0.5 * velocity[k] for k in theta}
        server.aggregate(record)
        for name in GLOBAL:
            assert torch.equal(server.global_state[name], theta[name].float())
    assert torch.equal(stage.state_dict()["momentum/a"], velocity["a"])


def test_adaptive_clipping_moves_the_norm_by_the_noised_share_of_updates_within_it():
    plan = _plan(noise_multiplier=2.0, count_stddev=1.5)
    assert plan.delta_noise_multiplier == pytest.approx(
        1 / math.sqrt(1 / 2.0**2 - 1 / (2 * 1.5) ** 2), rel=1e-12
    )
    adaptive = AdaptiveClippingConfig(target_quantile=0.5, learning_rate=0.2)
    stage = CentralPrivacy(plan, robustness_bound=None, adaptive=adaptive, noise=SeededNoise(SEED))
    server = _server(stage)
    record = server.begin_round(1)
    _send(server, record, 0, [0.3, 0.4], [[0.0], [0.0]])  # within C = 1
    _send(server, record, 1, [3.0, 0.0], [[0.0], [4.0]])  # beyond
    _send(server, record, 2, [0.0, 0.6], [[0.0], [0.0]])  # within
    server.aggregate(record)
    count_noise = float(_noise("dp-count-noise", 1, 1.5, shapes=(("count", ()),))["count"])
    within = ((1 - 0.5) + (0 - 0.5) + (1 - 0.5) + count_noise) / 2 + 0.5  # centred bits, K = 2
    fraction = min(1.0, max(0.0, within))
    assert record.stage_metrics["unclipped_fraction"] == pytest.approx(fraction, rel=1e-12)
    assert stage.clip_norm == pytest.approx(math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
    assert record.stage_metrics["noise_std"] == pytest.approx(plan.delta_noise_multiplier / 2, rel=1e-12)
    assert server.begin_round(2).stage_metrics["clip_norm"] == stage.clip_norm
    assert server.max_update_norm == stage.clip_norm


def test_by_default_the_noise_cannot_be_reproduced_from_the_configuration():
    # Today's code drew it from derive_seed(run seed, "dp-noise", round): whoever held the config
    # subtracted it. By default it now comes from the operating system: two servers with the same
    # seed release different prompts, and neither release is the seeded noise.
    config = load_config(overrides=_CENTRAL)
    assert config.privacy.noise_seed == "system"
    released = []
    for _ in range(2):
        (stage,) = privacy_stages(config)
        server = _server(stage)
        record = server.begin_round(1)
        _send(server, record, 0, [0.0, 0.0], [[0.0], [0.0]])
        previous = _as64(server.global_state)
        released.append(
            {n: t - previous[n] for n, t in stage.apply(server, record, previous, previous).items()}
        )
    assert not torch.equal(released[0]["a"], released[1]["a"])
    std = config.privacy.noise_multiplier * config.privacy.clip_norm / stage.plan.expected_clients
    for seed in (SEED, config.seed):
        seeded = {
            n: std * t for n, t in SeededNoise(seed).normal({"a": (2,), "b": (2, 1)}, "dp-noise", 1).items()
        }
        assert not any(torch.allclose(released[0][n], seeded[n]) for n in seeded)


def test_under_central_dp_the_client_sample_cannot_be_reproduced_from_the_seed():
    config = load_config(overrides=[*_CENTRAL, "partition.num_clients=200", "federation.fraction=0.1"])
    from fedprompt.execution.simulation import make_server

    experiment = SimpleNamespace(initial_state=lambda: dict(GLOBAL), strategy=FedAvg())
    samples = [make_server(experiment, config, range(200)).sample(1) for _ in range(2)]
    seeded = poisson_sample_clients(range(200), 0.1, config.seed, 1)
    assert samples[0] != samples[1] and seeded not in samples  # P(equal by chance) ~ 1e-14
    plain = load_config(overrides=["partition.num_clients=200", "federation.fraction=0.1"])
    first, second = (make_server(experiment, plain, range(200)).sample(1) for _ in range(2))
    assert first == second  # without DP the run seed decides, as before


def test_reproducible_noise_is_a_named_mode_and_says_so():
    config = load_config(overrides=[*_CENTRAL, "privacy.noise_seed=reproducible-insecure"])
    (stage,) = privacy_stages(config)
    assert isinstance(stage.noise, SeededNoise) and stage.noise.seed == config.seed
    assert "not private" in PrivacyConfig.model_fields["noise_seed"].description


@pytest.mark.parametrize(
    ("legacy", "kind", "now"),
    [("run", "central", "reproducible-insecure"), ("secret", "central", "system"), ("run", "none", None)],
)
def test_old_noise_seed_values_read_as_what_they_meant(legacy, kind, now):
    section = {"kind": kind, "noise_seed": legacy}
    if kind != "none":
        section.update({"clip_norm": 1.0, "noise_multiplier": 1.0})
    privacy = PrivacyConfig.model_validate(section)
    assert privacy.noise_seed == (now or "system") and privacy.kind == kind


# --------------------------------------------------------------------------- loud checks


def test_an_update_that_skipped_clipping_fails_the_round_instead_of_being_released():
    server = _server(CentralPrivacy(_plan(), robustness_bound=None, noise=SeededNoise(SEED)))
    record = server.begin_round(1)
    server.max_update_norm = None  # a pipeline that did not clip
    _send(server, record, 0, [3.0, 0.0], [[0.0], [4.0]])
    server.aggregate(record)
    assert "PrivacyCheckFailed" in record.aggregation_error
    assert "did not go through norm clipping" in record.aggregation_error
    assert all(torch.equal(server.global_state[n], GLOBAL[n]) for n in GLOBAL)


def test_an_update_longer_than_the_bound_fails_the_round():
    server = _server(CentralPrivacy(_plan(), robustness_bound=None, noise=SeededNoise(SEED)))
    record = server.begin_round(1)
    server.max_update_norm = 10.0  # clipped, but to a bound above C
    _send(server, record, 0, [3.0, 0.0], [[0.0], [4.0]])
    server.aggregate(record)
    assert "after clipping, above the bound 1.0" in record.aggregation_error
    assert all(torch.equal(server.global_state[n], GLOBAL[n]) for n in GLOBAL)


def test_an_update_of_other_shapes_than_the_noise_is_refused():
    stage = CentralPrivacy(_plan(), robustness_bound=None, noise=SeededNoise(SEED))
    record = RoundRecord(1, [0], accepted=[Update(0, {"a": torch.zeros(3), "b": torch.zeros(2, 1)}, 1)])
    record.norms[0] = 0.0
    with pytest.raises(PrivacyCheckFailed, match="the noise covers"):
        stage.apply(None, record, GLOBAL, GLOBAL)


# --------------------------------------------------------------------------- local DP


def test_local_rule_clips_and_noises_the_upload_with_the_clients_seed_only_when_asked():
    rule = LocalPrivacyRule(
        ClientRule(), clip_norm=1.0, noise_multiplier=0.5, noise_mode="reproducible-insecure"
    )
    trained = {"a": GLOBAL["a"] + torch.tensor([3.0, 0.0]), "b": GLOBAL["b"] + torch.tensor([[0.0], [4.0]])}
    instructions = FitInstructions(round=3, seed=123)
    output = rule.finish(RoundInputs(GLOBAL, {}, instructions), trained, OptimizationStats())
    generator = torch_generator(derive_seed(123, "local-dp-noise"))
    noise = {
        n: 0.5 * torch.randn(GLOBAL[n].shape, generator=generator, dtype=torch.float64) for n in ("a", "b")
    }
    clipped = {"a": torch.tensor([0.6, 0.0]), "b": torch.tensor([[0.0], [0.8]])}
    for name in GLOBAL:
        expected = GLOBAL[name].double() + clipped[name].double() + noise[name]
        assert torch.allclose(output.state[name], expected, atol=1e-12)


def test_local_noise_does_not_depend_on_what_the_server_sends():
    # Today's default drew the client's noise from the round seed in the server's instructions, so
    # the server could subtract it. By default it is now the client's own operating system's.
    rule = LocalPrivacyRule(ClientRule(), clip_norm=1.0, noise_multiplier=0.5)
    assert rule.noise_mode == "system"
    trained = {"a": GLOBAL["a"] + torch.tensor([0.3, 0.0]), "b": GLOBAL["b"].clone()}
    inputs = RoundInputs(GLOBAL, {}, FitInstructions(round=3, seed=123))
    first, second = (rule.finish(inputs, trained, OptimizationStats()).state for _ in range(2))
    assert not torch.equal(first["a"], second["a"])  # the same instructions, other noise
    generator = torch_generator(derive_seed(123, "local-dp-noise"))
    seeded = 0.5 * torch.randn((2,), generator=generator, dtype=torch.float64)
    assert not torch.allclose(first["a"] - trained["a"].double(), seeded)


def test_local_accountant_reports_the_client_that_uploaded_most():
    plan = _plan(kind="local", poisson=False, noise_multiplier=4.0)
    stage = LocalPrivacyAccountant(plan)
    server = _server(stage)
    for round_num, sampled in ((1, [0, 1]), (2, [1, 2]), (3, [1])):
        record = RoundRecord(round_num, sampled)
        stage.begin_round(server, record)
    assert stage.uploads.tolist() == [1, 3, 1, 0]
    assert record.stage_metrics["epsilon"] == plan.epsilon(3)


# --------------------------------------------------------------------------- the accountant


def test_central_epsilon_is_dp_accountings_poisson_sampled_gaussian_and_opacus_agrees():
    plan = _plan(noise_multiplier=1.1, population=1000, expected_clients=50.0, delta=1e-5)
    direct = RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 40)
    assert plan.epsilon(40) == direct.get_epsilon(1e-5)
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.05, 40)]
    assert plan.epsilon(40) == pytest.approx(opacus.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), rel=1e-9)
    assert plan.epsilon(0) == 0.0 and plan.epsilon(10) < plan.epsilon(40)


def test_fixed_size_sampling_is_accounted_without_replacement_for_replace_one_neighbours():
    plan = _plan(noise_multiplier=1.1, population=1000, expected_clients=50.0, poisson=False)
    direct = RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE)
    # replacing a client moves the clipped sum by up to 2C: the noise is σC = (σ/2)·2C
    direct.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(1000, 50, dp_accounting.GaussianDpEvent(0.55)), 40
    )
    assert plan.epsilon(40) == direct.get_epsilon(1e-5)


def test_local_epsilon_composes_one_gaussian_per_upload():
    plan = _plan(kind="local", poisson=False, noise_multiplier=6.0)
    direct = RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.GaussianDpEvent(3.0), 5)
    assert plan.epsilon(5) == direct.get_epsilon(1e-5)


def test_target_epsilon_gives_the_smallest_noise_that_meets_it():
    config = load_config(
        overrides=[
            "partition.num_clients=200",
            "federation.rounds=30",
            "federation.fraction=0.1",
            "federation.min_clients=1",
            "privacy.kind=central",
            "privacy.clip_norm=0.5",
            "privacy.target_epsilon=4",
        ]
    )
    plan = plan_privacy(config)
    assert plan.expected_clients == pytest.approx(20.0) and plan.sampling == "poisson"
    assert plan.epsilon(30) <= 4.0 < plan.epsilon(30, plan.noise_multiplier * 0.99)


# --------------------------------------------------------------------------- Poisson sampling


def test_poisson_sampling_is_seeded_and_has_its_rate():
    ids = list(range(1000))
    first = poisson_sample_clients(ids, 0.1, 3, 5)
    assert first == poisson_sample_clients(list(reversed(ids)), 0.1, 3, 5)
    assert first != poisson_sample_clients(ids, 0.1, 3, 6) and first != poisson_sample_clients(ids, 0.1, 4, 5)
    counts = [len(poisson_sample_clients(ids, 0.1, 3, r)) for r in range(1, 201)]
    # 200 rounds of Binomial(1000, 0.1): mean 100, standard error 0.67; some rounds far from 100
    assert abs(sum(counts) / len(counts) - 100) < 3 and min(counts) != max(counts)
    hits = [0] * 1000
    for r in range(1, 201):
        for cid in poisson_sample_clients(ids, 0.1, 3, r):
            hits[cid] += 1
    assert abs(sum(hits[:500]) - sum(hits[500:])) < 6 * math.sqrt(2 * 200 * 500 * 0.09)
    assert poisson_sample_clients(ids[:5], 1.0, 3, 1) == ids[:5]
    with pytest.raises(ValueError, match="lies in"):
        poisson_sample_clients(ids, 0.0, 3, 1)


# --------------------------------------------------------------------------- refusals


_CENTRAL = [
    "privacy.kind=central",
    "privacy.clip_norm=1",
    "privacy.noise_multiplier=1",
    "federation.min_clients=1",
]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["privacy.clip_norm=1"], "clip_norm apply to a differentially private run; set kind"),
        (["privacy.kind=central", "privacy.noise_multiplier=1"], "needs clip_norm"),
        (["privacy.kind=local", "privacy.clip_norm=1"], "needs noise_multiplier .* or target_epsilon"),
        (
            [
                "privacy.kind=local",
                "privacy.clip_norm=1",
                "privacy.noise_multiplier=1",
                "privacy.server_momentum=0.9",
            ],
            "server_momentum apply to kind central",
        ),
        (
            [
                "privacy.kind=local",
                "privacy.clip_norm=1",
                "privacy.noise_multiplier=1",
                "privacy.sampling=fixed",
            ],
            "sampling apply to kind central",
        ),
        (
            [*_CENTRAL[:3], "privacy.adaptive_clipping={}", "privacy.kind=local"],
            "adaptive_clipping apply to kind central",
        ),
        ([*_CENTRAL, "strategy.kind=fedadam"], "strategy.kind 'fedadam' would see each update unnoised"),
        ([*_CENTRAL, "strategy.kind=median"], "strategy.kind 'median' would see each update unnoised"),
        (_CENTRAL[:3], r"federation.min_clients \(2\) cannot be enforced: set federation.min_clients: 1"),
        ([*_CENTRAL, "privacy.delta=0.2"], r"privacy.delta \(0.2\) is not below 1 / partition.num_clients"),
        (
            [
                "privacy.kind=local",
                "privacy.clip_norm=1",
                "privacy.noise_multiplier=1",
                "strategy.kind=reliability",
            ],
            "strategy.kind 'reliability' also uses what clients send",
        ),
        (
            [*_CENTRAL, "secure_aggregation.enabled=true"],
            "clips each client's update on the server, which secure aggregation hides",
        ),
        (
            [*_CENTRAL[1:3], "privacy.kind=local", "strategy.kind=scaffold", "optimizer.algorithm=sgd"],
            "strategy.kind 'scaffold' also uses what clients send",
        ),
        (
            [*_CENTRAL[1:3], "privacy.kind=local", "strategy.kind=fednova"],
            "strategy.kind 'fednova' also uses what clients send",
        ),
        ([*_CENTRAL, "privacy.sampling=sometimes"], "privacy.sampling"),
        ([*_CENTRAL, "privacy.clip_norm=0"], "privacy.clip_norm"),
    ],
)
def test_bad_privacy_configs_fail_at_config_time_naming_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_fixed_sampling_and_any_strategy_with_local_dp_are_allowed():
    load_config(overrides=[*_CENTRAL[:3], "privacy.sampling=fixed"])  # min_clients 2 is then kept
    load_config(overrides=[*_CENTRAL[:3], "privacy.kind=local", "strategy.kind=trimmed-mean"])


def test_a_noise_too_small_for_the_target_is_refused_at_start_with_the_numbers(keyword_file, tmp_path):
    config = tiny_run_config(
        keyword_file,
        backbone={"model": str(tmp_path / "no-model-here"), "random_config": None},
        federation={"rounds": 10, "min_clients": 1},
        privacy={"kind": "central", "clip_norm": 1.0, "noise_multiplier": 0.3, "target_epsilon": 1.0},
    )
    with pytest.raises(
        ConfigError, match=r"noise_multiplier: 0.3 spends ε=\d+\.\d+ at δ=1e-05 over 10 rounds"
    ) as err:
        fedprompt.run(config, write=False)  # refused before the (missing) model is looked for
    needed = float(str(err.value).split("at least ")[1].split(",")[0])
    assert plan_privacy(load_config({**config, "privacy": {**config["privacy"], "noise_multiplier": needed}}))


def test_adaptive_clipping_needs_count_noise_above_half_the_noise_multiplier():
    config = load_config(
        overrides=[*_CENTRAL, "privacy.noise_multiplier=3", "privacy.adaptive_clipping={count_stddev: 1.5}"]
    )
    with pytest.raises(ConfigError, match=r"count_stddev: σ_b=1.5 .* raise count_stddev above 1.5"):
        plan_privacy(config)


# --------------------------------------------------------------------------- end to end


def _private_run(keyword_file, rounds: int, **privacy) -> dict:
    config = tiny_run_config(
        keyword_file,
        federation={"rounds": rounds, "min_clients": 1, "fraction": 0.5},
        optimizer={"lr": 0.1, "epochs": 1, "batch_size": 8, "max_steps": 2},
        partition={"kind": "iid", "num_clients": 4, "local_val_fraction": 0.0},
        privacy={"kind": "central", "clip_norm": 0.5, **privacy},
    )
    return {**config, "seed": 1}


def test_a_private_run_reports_epsilon_each_round_and_resumes_bit_exactly(keyword_file, tmp_path):
    settings = {
        "noise_multiplier": 0.8,
        "adaptive_clipping": {"count_stddev": 1.0},
        "server_momentum": 0.5,
        "noise_seed": "reproducible-insecure",  # bit-identical runs: a simulation's named mode
    }
    assert [poisson_sample_clients(range(4), 0.5, 1, r) for r in (1, 2, 3)][1] == []  # round 2: nobody
    straight = fedprompt.run(_private_run(keyword_file, 3, **settings), output_dir=tmp_path / "a")
    plan = plan_privacy(load_config(_private_run(keyword_file, 3, **settings)))
    rows = straight.history[1:]
    assert [r["epsilon"] for r in rows] == [plan.epsilon(r) for r in (1, 2, 3)]
    assert rows[1]["clients_sampled"] == 0 and "aggregation_error" not in rows[1]
    assert len({r["clip_norm"] for r in rows}) == 3  # adaptive clipping moved it every round
    summary = straight.summary
    assert summary["final_epsilon"] == plan.epsilon(3)
    assert summary["privacy"] == "central" and summary["sampling"] == "poisson"
    assert (summary["delta"], summary["noise_multiplier"], summary["sampling_rate"]) == (1e-5, 0.8, 0.5)
    assert summary["noise_seed"] == "reproducible-insecure"
    assert "does not hold against anyone who holds its configuration" in summary["privacy_warning"]

    partial = fedprompt.run(_private_run(keyword_file, 2, **settings), output_dir=tmp_path / "b")
    resumed = fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=3"])
    assert torch.equal(resumed.final_state["prompt.embeddings"], straight.final_state["prompt.embeddings"])
    drop = {"time_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight.history
    ]


def test_a_resume_may_not_recalibrate_the_noise_of_a_target_epsilon(keyword_file, tmp_path):
    partial = fedprompt.run(_private_run(keyword_file, 1, target_epsilon=20.0), output_dir=tmp_path)
    with pytest.raises(ValueError, match="calibrated to noise_multiplier"):
        fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=2"])


def test_a_local_dp_run_accounts_each_clients_uploads(keyword_file):
    config = _private_run(keyword_file, 2, kind="local", noise_multiplier=20.0)
    config["federation"]["fraction"] = 1.0
    result = fedprompt.run(config, write=False)
    plan = plan_privacy(load_config(config))
    assert [r["epsilon"] for r in result.history[1:]] == [plan.epsilon(1), plan.epsilon(2)]
    assert [r["clients_accepted"] for r in result.history[1:]] == [4, 4]
    assert result.summary["sampling"].startswith("fixed (no amplification")
    assert result.summary["noise_seed"] == "system" and "privacy_warning" not in result.summary


# --------------------------------------------------------------------------- nothing released twice


def test_a_resumed_run_never_recomputes_a_round_whose_aggregate_was_released(
    keyword_file, tmp_path, monkeypatch
):
    # Round 2 is aggregated without client 1 (it failed), its noised prompt goes out to the
    # evaluation, and the run stops there. Recomputing round 2 on resume, with client 1 back, would
    # release a second noised prompt of round 2 whose difference from the first exposes client 1.
    import fedprompt.execution.simulation as simulation

    config = _private_run(keyword_file, 2, noise_multiplier=0.8)
    config["privacy"]["sampling"] = "fixed"
    config["federation"].update({"fraction": 1.0, "min_clients": 2})
    fit, evaluate = simulation._fit_client, simulation.evaluate_round
    released = {}

    def failing_fit(experiment, server, record, cid):
        if record.round == 2 and cid == 1:
            server.reject(record, cid, "client failed: ConnectionError: gone")
            return
        fit(experiment, server, record, cid)

    def crashing_evaluation(experiment, server, cfg):
        if server.completed_rounds == 2:
            released.update({k: v.clone() for k, v in server.global_state.items()})
            raise KeyboardInterrupt("the server stops after releasing round 2")
        return evaluate(experiment, server, cfg)

    monkeypatch.setattr(simulation, "_fit_client", failing_fit)
    monkeypatch.setattr(simulation, "evaluate_round", crashing_evaluation)
    with pytest.raises(KeyboardInterrupt):
        fedprompt.run(config, output_dir=tmp_path)
    (run_dir,) = tmp_path.iterdir()
    monkeypatch.setattr(simulation, "_fit_client", fit)
    monkeypatch.setattr(simulation, "evaluate_round", evaluate)

    resumed = fedprompt.run(resume=run_dir)
    assert torch.equal(resumed.final_state["prompt.embeddings"], released["prompt.embeddings"])
    assert [r["round"] for r in resumed.history] == [0, 1, 2]
    assert resumed.history[2]["clients_accepted"] == 3 and "global_accuracy" in resumed.history[2]
    rows = [r for r in resumed.client_history if r["event"] == "fit" and r["round"] == 2]
    assert sorted(r["client_id"] for r in rows) == [0, 1, 2, 3]  # written once
