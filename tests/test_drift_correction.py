"""SCAFFOLD, FedDyn, FedAvgM and FedNova: server steps and client rules against hand computations
on tiny tensors, the configurations they refuse, and the local optimiser's gradient scale."""

from __future__ import annotations

import pytest
import torch

from fedprompt.config import (
    ConfigError,
    FedAvgConfig,
    FedAvgMConfig,
    FedDynConfig,
    FedNovaConfig,
    RunConfig,
    ScaffoldConfig,
    load_config,
)
from fedprompt.federation.client_rules import RoundInputs
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.federation.strategies.fedavgm import FedAvgM
from fedprompt.federation.strategies.feddyn import FedDyn, FedDynRule
from fedprompt.federation.strategies.fednova import FedNova, LocalStepBound, normalizer
from fedprompt.federation.strategies.registry import build_client_rule, build_strategy
from fedprompt.federation.strategies.scaffold import Scaffold, ScaffoldRule
from optimizers.base import OptimizationStats
from optimizers.gradient import GradientOptimizer, GradientSettings


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def upd(cid: int, n: int, values, extras: State | None = None, steps: float | None = None) -> Update:
    metrics = {} if steps is None else {"steps": float(steps)}
    return Update(cid, {"p": t(*values)}, n, metrics, extras or {})


def assert_values(tensor: torch.Tensor, values) -> None:
    assert tensor.dtype == torch.float32
    assert torch.equal(tensor, t(*values)), (tensor, values)


def stats(scale: float | None) -> OptimizationStats:
    return OptimizationStats(steps=5, gradient_scale=scale)


# --------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_server_step_and_control_variate_by_hand():
    s = Scaffold(num_clients=4, server_lr=0.5)
    s.initialize({"p": t(0, 0)})
    assert_values(s.downlink_extras()["control/p"], [0, 0])
    assert s.uplink_extras() == {"control/p": (2,)}
    updates = [
        upd(0, 1, [1, 2], {"control/p": t(2, 0)}),
        upd(1, 3, [3, -2], {"control/p": t(-2, 4)}),
    ]
    out = s.aggregate({"p": t(0, 0)}, updates)
    # Δx = 0.25·[1, 2] + 0.75·[3, −2] = [2.5, −1]; x = 0 + 0.5·Δx
    assert_values(out["p"], [1.25, -0.5])
    # Δc = 0.25·[2, 0] + 0.75·[−2, 4] = [−1, 3]; c = 0 + (2/4)·Δc
    assert_values(s.downlink_extras()["control/p"], [-0.5, 1.5])
    # round 2, one client: x = [1.25, −0.5] + 0.5·([2.25, 0.5] − x); c += (1/4)·[1, −2]
    out = s.aggregate(out, [upd(2, 5, [2.25, 0.5], {"control/p": t(1, -2)})])
    assert_values(out["p"], [1.75, 0.0])
    assert_values(s.state_dict()["c/p"], [-0.25, 1.0])


def test_scaffold_state_round_trips_and_resets():
    s = Scaffold(num_clients=2)
    s.initialize({"p": t(0, 0)})
    s.aggregate({"p": t(0, 0)}, [upd(0, 1, [1, 1], {"control/p": t(4, -2)})])
    saved = s.state_dict()
    other = Scaffold(num_clients=2)
    other.initialize({"p": t(0, 0)})
    other.load_state_dict(saved)
    assert_values(other.downlink_extras()["control/p"], [2, -1])
    other.initialize({"p": t(0, 0)})  # a loaded state is kept
    assert_values(other.downlink_extras()["control/p"], [2, -1])
    other.load_state_dict({})
    assert_values(other.downlink_extras()["control/p"], [0, 0])
    with pytest.raises(ValueError, match="not of the form c/<tensor>"):
        other.load_state_dict({"m/p": t(0, 0)})
    with pytest.raises(ValueError, match="load the checkpoint that matches this prompt"):
        other.load_state_dict({"c/p": t(0, 0, 0)})


def test_scaffold_rejects_updates_without_their_control_variate_change():
    s = Scaffold(num_clients=2)
    s.initialize({"p": t(0, 0)})
    with pytest.raises(ValueError, match="extra tensors"):
        s.aggregate({"p": t(0, 0)}, [upd(0, 1, [1, 1])])


def test_scaffold_rule_corrects_the_gradient_by_c_minus_ci():
    rule = ScaffoldRule()
    downlink = {"p": t(1, 1)}
    instructions = FitInstructions(round=2, seed=0, extras={"control/p": t(0.25, -0.5)})
    carried = {"control/p": t(0.75, 0)}
    penalty = rule.penalty(RoundInputs(downlink, carried, instructions))
    theta = torch.tensor([3.0, -1.0], requires_grad=True)
    value = penalty({"p": theta})
    value.backward()
    assert torch.equal(theta.grad, t(-0.5, -0.5))  # c − c_i
    assert value.item() == (3 - 1) * -0.5 + (-1 - 1) * -0.5  # ⟨c − c_i, θ − x⟩
    assert float(penalty({"p": t(1, 1)})) == 0  # zero where the round starts


def test_scaffold_rule_option_two_by_hand():
    rule = ScaffoldRule()
    instructions = FitInstructions(round=2, seed=0, extras={"control/p": t(0.25, -0.5)})
    inputs = RoundInputs({"p": t(1, 1)}, {"control/p": t(0.75, 0)}, instructions)
    out = rule.finish(inputs, {"p": t(0.5, 2)}, stats(scale=0.5))
    # c_i⁺ = c_i − c + (x − y)/(K·η) = [0.75, 0] − [0.25, −0.5] + [0.5, −1]/0.5 = [1.5, −1.5]
    assert_values(out.carried["control/p"], [1.5, -1.5])
    assert_values(out.extras["control/p"], [0.75, -1.5])  # Δc_i = c_i⁺ − c_i
    assert_values(out.state["p"], [0.5, 2])  # y_i is what travels
    first = rule.finish(RoundInputs({"p": t(1, 1)}, {}, instructions), {"p": t(0.5, 2)}, stats(scale=0.5))
    assert_values(first.carried["control/p"], [0.75, -1.5])  # c_i starts at zero


def test_scaffold_rule_needs_a_gradient_scale():
    with pytest.raises(ValueError, match=r"optimizer\.algorithm: sgd"):
        inputs = RoundInputs({"p": t(1, 1)}, {}, FitInstructions(round=1, seed=0))
        ScaffoldRule().finish(inputs, {"p": t(0, 0)}, stats(scale=None))


# --------------------------------------------------------------------------- the gradient scale


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sgd_gradient_scale_turns_the_displacement_back_into_the_gradient(momentum):
    """With a constant gradient g, SGD moves θ by exactly gradient_scale·g, and gradient_scale is
    FedNova's a_i·η (K·η without momentum)."""
    g = torch.tensor([0.5, -2.0], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    settings = GradientSettings(algorithm="sgd", lr=0.25, momentum=momentum, epochs=1, grad_clip=None)
    result = GradientOptimizer(settings).run(
        [theta], lambda batch: ((theta * g).sum(), 1), lambda epoch: range(4), lr_factor=lambda step: 0.5
    )
    assert result.steps == 4
    assert result.gradient_scale == pytest.approx(0.125 * normalizer(4, momentum), rel=1e-15)
    assert torch.allclose(-theta.detach() / result.gradient_scale, g, rtol=1e-14, atol=0)


def test_adamw_reports_no_gradient_scale():
    theta = torch.zeros(2, requires_grad=True)
    settings = GradientSettings(algorithm="adamw", lr=0.1, epochs=1)
    result = GradientOptimizer(settings).run([theta], lambda b: (theta.sum(), 1), lambda e: range(2))
    assert result.gradient_scale is None


def test_lr_factor_sets_each_step_learning_rate():
    theta = torch.zeros(1, requires_grad=True)
    settings = GradientSettings(algorithm="sgd", lr=1.0, momentum=0.0, epochs=1, grad_clip=None)
    factors = [1.0, 0.5, 0.25]
    GradientOptimizer(settings).run(
        [theta], lambda b: (theta.sum(), 1), lambda e: range(3), lr_factor=lambda step: factors[step]
    )
    assert theta.item() == -1.75  # Σ η_k·1


# --------------------------------------------------------------------------- FedDyn


def test_feddyn_server_by_hand_over_two_rounds():
    s = FedDyn(num_clients=4, alpha=0.5)
    s.initialize({"p": t(0, 0)})
    assert s.client_config() == {"feddyn_alpha": 0.5}
    out = s.aggregate({"p": t(0, 0)}, [upd(0, 1, [1, 2]), upd(1, 7, [3, -2])])
    # mean = [2, 0] (unweighted); h = 0 − 0.5/4·[4, 0] = [−0.5, 0]; θ = mean − h/α = [3, 0]
    assert_values(s.state_dict()["h/p"], [-0.5, 0])
    assert_values(out["p"], [3, 0])
    out = s.aggregate(out, [upd(2, 1, [3, 1]), upd(3, 1, [5, 1])])
    # mean = [4, 1]; Σ(θ_k − θ) = [2, 2]; h = [−0.5, 0] − 0.125·[2, 2]; θ = [4, 1] − h/0.5
    assert_values(s.state_dict()["h/p"], [-0.75, -0.25])
    assert_values(out["p"], [5.5, 1.5])


def test_feddyn_rule_by_hand():
    rule = FedDynRule()
    instructions = FitInstructions(round=3, seed=0, client_config={"feddyn_alpha": 0.5})
    downlink, carried = {"p": t(1, 1)}, {"dynamic/p": t(0.5, -1)}
    penalty = rule.penalty(RoundInputs(downlink, carried, instructions))
    theta = torch.tensor([2.0, 0.0], requires_grad=True)
    value = penalty({"p": theta})
    value.backward()
    # −⟨g, θ − x⟩ + (α/2)‖θ − x‖² = −(0.5 + 1) + 0.25·2; gradient −g + α(θ − x) = [0, 0.5]
    assert value.item() == -1.0
    assert torch.equal(theta.grad, t(0, 0.5))
    out = rule.finish(RoundInputs(downlink, carried, instructions), {"p": t(2, 0)}, stats(None))
    assert_values(out.carried["dynamic/p"], [0, -0.5])  # g − α(θ_k − x)
    assert out.extras == {}


def test_feddyn_h_stays_the_mean_of_every_clients_linear_term():
    """The server's h and the clients' g_k, run together with partial participation."""
    m, alpha = 3, 0.25
    server, rule = FedDyn(num_clients=m, alpha=alpha), FedDynRule()
    x = {"p": t(0, 0)}
    server.initialize(x)
    carried: dict[int, State] = {k: {} for k in range(m)}
    trained = {1: [[1, 2], [0, 4], [3, 3]], 2: [[2, -2], None, [1, 0]]}
    for round_num, states in trained.items():
        updates = []
        instructions = FitInstructions(round=round_num, seed=0, client_config=server.client_config())
        for k, values in enumerate(states):
            if values is None:
                continue
            out = rule.finish(RoundInputs(x, carried[k], instructions), {"p": t(*values)}, stats(None))
            carried[k] = out.carried
            updates.append(upd(k, 1, values))
        x = server.aggregate(x, updates)
    mean_g = sum(carried[k]["dynamic/p"].double() for k in range(m)) / m
    assert torch.allclose(server.state_dict()["h/p"].double(), mean_g, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- FedAvgM and the server lr


def test_fedavgm_momentum_by_hand():
    s = FedAvgM(server_lr=2.0, momentum=0.5)
    assert s.state_dict() == {}
    out = s.aggregate({"p": t(0, 0)}, [upd(0, 1, [1, 2]), upd(1, 3, [3, -2])])
    # Δ = [2.5, −1]; v = Δ; θ = 0 + 2v
    assert_values(out["p"], [5, -2])
    out = s.aggregate(out, [upd(0, 1, [6, -2])])
    # Δ = [1, 0]; v = 0.5·[2.5, −1] + [1, 0] = [2.25, −0.5]; θ = [5, −2] + 2v
    assert_values(s.state_dict()["v/p"], [2.25, -0.5])
    assert_values(out["p"], [9.5, -3])


def test_fedavg_server_lr_steps_along_the_average():
    assert type(build_strategy(FedAvgConfig())) is FedAvg
    s = build_strategy(FedAvgConfig(server_lr=0.5))
    out = s.aggregate({"p": t(1, 1)}, [upd(0, 1, [2, 3]), upd(1, 1, [4, -1])])
    assert_values(out["p"], [2, 1])  # [1, 1] + 0.5·([3, 1] − [1, 1])
    assert s.state_dict() == {}

    uniform = build_strategy(FedAvgConfig(server_lr=0.5, weighting="uniform"))
    out = uniform.aggregate({"p": t(1, 1)}, [upd(0, 1, [2, 3]), upd(1, 3, [4, -1])])
    assert_values(out["p"], [2, 1])  # counts ignored: [1, 1] + 0.5·([3, 1] − [1, 1])
    out = s.aggregate({"p": t(1, 1)}, [upd(0, 1, [2, 3]), upd(1, 3, [4, -1])])
    assert_values(out["p"], [2.25, 0.5])  # by examples: [1, 1] + 0.5·([3.5, 0] − [1, 1])


def test_fedavgm_state_round_trips():
    s = FedAvgM(server_lr=1.0, momentum=0.9)
    s.aggregate({"p": t(0, 0)}, [upd(0, 1, [1, 2])])
    other = FedAvgM(server_lr=1.0, momentum=0.9)
    other.load_state_dict(s.state_dict())
    a = s.aggregate({"p": t(1, 2)}, [upd(0, 1, [3, 3])])
    b = other.aggregate({"p": t(1, 2)}, [upd(0, 1, [3, 3])])
    assert torch.equal(a["p"], b["p"])
    with pytest.raises(ValueError, match="keeps no buffer"):
        FedAvgM(momentum=0.0).load_state_dict(s.state_dict())


# --------------------------------------------------------------------------- FedNova


def test_fednova_normalises_by_local_steps_by_hand():
    s = FedNova(LocalStepBound(epochs=1, batch_size=2))
    out = s.aggregate({"p": t(0)}, [upd(0, 4, [3], steps=2), upd(1, 8, [12], steps=4)])
    # p = [1/3, 2/3]; a = [2, 4]; τ_eff = 10/3; d = [1.5, 3]; θ = τ_eff·(0.5 + 2) = 25/3
    assert torch.allclose(out["p"], t(25 / 3), rtol=1e-7)
    assert s.report() == {"fednova_tau_eff": pytest.approx(10 / 3)}
    same_steps = s.aggregate({"p": t(0)}, [upd(0, 4, [3], steps=2), upd(1, 8, [12], steps=2)])
    assert torch.allclose(same_steps["p"], t(9), rtol=1e-7)  # equal a_i: FedAvg's 1 + 8


def test_fednova_momentum_normaliser_matches_the_paper():
    # a = [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ): τ = 2, ρ = 0.5 → (2 − 0.75)/0.5
    assert normalizer(2, 0.5) == 2.5
    assert normalizer(7, 0.0) == 7.0
    s = FedNova(LocalStepBound(epochs=1, batch_size=1), momentum=0.5)
    out = s.aggregate({"p": t(0)}, [upd(0, 2, [5], steps=2), upd(1, 2, [1], steps=1)])
    # a = [2.5, 1]; p = [0.5, 0.5]; τ_eff = 1.75; Σ p d = 0.5·2 + 0.5·1 = 1.5
    assert torch.allclose(out["p"], t(2.625), rtol=1e-7)


@pytest.mark.parametrize(
    ("steps", "match"),
    [(None, "needs the client's 'steps'"), (0, "from 1 to 3"), (4, "from 1 to 3"), (1.5, "whole number")],
)
def test_fednova_rejects_steps_it_cannot_bound(steps, match):
    s = FedNova(LocalStepBound(epochs=1, batch_size=2))
    with pytest.raises(ValueError, match=match):
        s.validate_update(upd(0, 5, [1], steps=steps))


def test_fednova_bounds_steps_by_the_clamped_example_count():
    s = FedNova(LocalStepBound(epochs=2, batch_size=4, max_steps=10))
    assert s.bound(5) == 4 and s.bound(100) == 10
    s.validate_update(upd(0, 40, [1], steps=10))
    # the pipeline clamped the count to 4 examples after validation: 2 steps at most
    out = s.aggregate({"p": t(0)}, [upd(0, 4, [4], steps=10), upd(1, 4, [2], steps=2)])
    assert torch.allclose(out["p"], t(3), rtol=1e-7)  # both a_i = 2: plain averaging


# --------------------------------------------------------------------------- config


def test_build_strategy_and_rules_for_the_new_kinds():
    run = RunConfig.model_validate(
        {
            "partition": {"num_clients": 7},
            "optimizer": {"algorithm": "sgd", "momentum": 0.5, "epochs": 2, "batch_size": 4, "max_steps": 9},
            "strategy": {"kind": "scaffold", "server_lr": 0.5},
        }
    )
    scaffold = build_strategy(run.strategy, run=run)
    assert isinstance(scaffold, Scaffold) and (scaffold.num_clients, scaffold.server_lr) == (7, 0.5)
    assert isinstance(build_client_rule(run.strategy), ScaffoldRule)
    dyn = build_strategy(FedDynConfig(alpha=0.1), run=run)
    assert isinstance(dyn, FedDyn) and (dyn.num_clients, dyn.alpha) == (7, 0.1)
    assert isinstance(build_client_rule(FedDynConfig()), FedDynRule)
    nova = build_strategy(FedNovaConfig(), run=run)
    assert isinstance(nova, FedNova) and nova.momentum == 0.5 and nova.bound == LocalStepBound(2, 4, 9)
    momentum = build_strategy(FedAvgMConfig(server_lr=0.3, momentum=0.7))
    assert isinstance(momentum, FedAvgM) and (momentum.server_lr, momentum.momentum) == (0.3, 0.7)
    with pytest.raises(ValueError, match="needs the run configuration"):
        build_strategy(ScaffoldConfig())


BLACK_BOX = {"prompt": {"kind": "intrinsic"}, "optimizer": {"kind": "cmaes"}}


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"strategy": {"kind": "scaffold"}}, r"needs optimizer\.algorithm: sgd"),
        ({**BLACK_BOX, "strategy": {"kind": "scaffold"}}, "black-box optimisers take none"),
        ({**BLACK_BOX, "strategy": {"kind": "feddyn"}}, "black-box optimisers take none"),
        ({**BLACK_BOX, "strategy": {"kind": "fednova"}}, "black-box optimisers take none"),
        ({"strategy": {"kind": "feddyn", "alpha": 0}}, "greater than 0"),
        ({"strategy": {"kind": "fedavgm", "momentum": 1}}, "less than 1"),
        ({"optimizer": {"lr": 0.01, "schedule": {"kind": "cosine", "min_lr": 0.1}}}, "exceeds lr"),
    ],
)
def test_configurations_that_make_no_sense_are_refused(sections, match):
    with pytest.raises(ConfigError, match=match):
        load_config(sections)


def test_scaffold_on_twin_prompts_needs_one_learning_rate():
    base = {
        "backbone": {"kind": "open-clip"},
        "data": {"source": "hub", "name": "x"},
        "optimizer": {"algorithm": "sgd"},
        "strategy": {"kind": "scaffold"},
    }
    RunConfig.model_validate({**base, "prompt": {"kind": "twin"}})
    with pytest.raises(ValueError, match="one learning rate and momentum"):
        RunConfig.model_validate({**base, "prompt": {"kind": "twin", "visual_optimizer": {"lr": 0.5}}})


# --------------------------------------------------------------------------- review fixes


def test_scaffold_defaults_to_the_papers_plain_sgd_steps():
    """Unless set, a SCAFFOLD run's optimiser takes plain SGD steps (no momentum, no clipping), so
    the correction g + c − c_i is applied as the paper applies it; other strategies keep the
    optimiser's defaults, and settings given explicitly stay and are named as departures."""
    run = load_config(None, ["strategy.kind=scaffold", "optimizer.algorithm=sgd"])
    assert run.optimizer.grad_clip is None and run.optimizer.momentum == 0.0
    assert run.paper_departures() == []
    assert load_config(run).optimizer.grad_clip is None  # a resolved config round-trips
    built = RunConfig(strategy=ScaffoldConfig(), optimizer={"algorithm": "sgd"})
    assert built.optimizer.grad_clip is None and built.optimizer.momentum == 0.0
    plain = load_config(None, ["strategy.kind=fedavg"])
    assert plain.optimizer.grad_clip == 1.0 and plain.optimizer.momentum == 0.9
    explicit = load_config(
        None, ["strategy.kind=scaffold", "optimizer.algorithm=sgd", "optimizer.grad_clip=1.0"]
    )
    assert explicit.optimizer.grad_clip == 1.0 and explicit.optimizer.momentum == 0.0
    assert explicit.paper_departures() == [
        "strategy.kind scaffold runs with optimizer.grad_clip: 1.0 where the paper's algorithm has null: "
        "not the published method"
    ]


class _OverflowScaler(torch.amp.GradScaler):
    """A CPU loss scaler (fp16's needs a GPU) whose inf checks are real: a step whose gradient
    overflows is skipped and the scale halves."""

    def __init__(self) -> None:
        super().__init__("cpu", init_scale=2.0**16)


def test_steps_skipped_by_the_loss_scaler_count_nowhere():
    """A step that fp16 loss scaling skips moves nothing: it is not a step, nor in K·η_l (SCAFFOLD)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = _OverflowScaler()
    theta = torch.zeros(2, requires_grad=True)
    slopes = [1.0, 1e36, 1.0, 1.0]  # the second batch's gradient overflows once scaled by 2^16
    settings = GradientSettings(algorithm="sgd", lr=0.5, momentum=0.0, epochs=1, grad_clip=None)
    result = GradientOptimizer(settings, accelerator).run(
        [theta], lambda slope: ((theta * slope).sum(), 1), lambda epoch: slopes
    )
    assert result.steps == 3 and result.extra["skipped_steps"] == 1.0
    assert result.examples == 4
    assert result.gradient_scale == 1.5  # K·η_l over the three steps taken, not four
    assert torch.equal(theta.detach(), t(-1.5, -1.5))
    with pytest.raises(ValueError, match="took none"):
        inputs = RoundInputs({"p": t(1, 1)}, {}, FitInstructions(round=1, seed=0))
        ScaffoldRule().finish(inputs, {"p": t(1, 1)}, OptimizationStats(steps=0, gradient_scale=0.0))


@pytest.mark.parametrize("kind", ["scaffold", "feddyn"])
def test_client_state_strategies_refuse_bounds_that_clip_after_the_client(kind):
    """c_i⁺ and FedDyn's g_k come from the client's unclipped update: a server-side norm bound (or
    local DP's clip) would make the server's view of that update differ from the client's."""
    base = [f"strategy.kind={kind}", "optimizer.algorithm=sgd"]
    with pytest.raises(ConfigError, match="max_update_norm clips each update on the server"):
        load_config(None, [*base, "robustness.max_update_norm=1.0"])
    local_dp = ["privacy.kind=local", "privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match=r"privacy\.kind local (clips and )?noises"):
        load_config(None, [*base, *local_dp])


VQA = {
    "backbone": {"kind": "open-clip"},
    "data": {"source": "vqa", "vqa": {"format": "easy-vqa"}},
    "prompt": {"kind": "vqa-twin"},
    "partition": {"local_val_fraction": 0.2},
}


def test_fednova_refuses_prompt_parts_with_their_own_momentum():
    """FedNova's a_i reads a client's steps with one momentum: twin and VQA prompts whose parts have
    momenta of their own would get a wrong a_i."""
    twin = {
        "backbone": {"kind": "open-clip"},
        "data": {"source": "hub", "name": "x"},
        "optimizer": {"algorithm": "sgd"},
        "strategy": {"kind": "fednova"},
    }
    RunConfig.model_validate({**twin, "prompt": {"kind": "twin", "visual_optimizer": {"lr": 0.5}}})
    with pytest.raises(ValueError, match="one momentum for the whole prompt"):
        RunConfig.model_validate({**twin, "prompt": {"kind": "twin", "visual_optimizer": {"momentum": 0.5}}})
    vqa = {**VQA, "optimizer": {"algorithm": "sgd"}, "strategy": {"kind": "fednova"}}
    with pytest.raises(ValueError, match=r"prompt\.text_optimizer/visual_optimizer/fusion_optimizer"):
        RunConfig.model_validate({**vqa, "prompt": {"kind": "vqa-twin", "fusion_optimizer": {"momentum": 0}}})
    adamw = {**vqa, "optimizer": {"algorithm": "adamw"}}  # AdamW: a_i = τ_i, no momentum read
    RunConfig.model_validate({**adamw, "prompt": {"kind": "vqa-twin", "fusion_optimizer": {"momentum": 0}}})


def test_scaffold_on_vqa_prompts_needs_one_learning_rate():
    vqa = {**VQA, "optimizer": {"algorithm": "sgd"}, "strategy": {"kind": "scaffold"}}
    RunConfig.model_validate(vqa)
    with pytest.raises(ValueError, match="one learning rate and momentum"):
        RunConfig.model_validate({**vqa, "prompt": {"kind": "vqa-twin", "visual_optimizer": {"lr": 0.5}}})
