"""Black-box optimisers: nevergrad CMA-ES (local), the server's CMA-ES update, SPSA."""

from __future__ import annotations

import math

import pytest
import torch

from optimizers.cma_update import CMAState, cma_tell, recombination_weights
from optimizers.cmaes import CMAESOptimizer, CMAESSettings
from optimizers.zeroth_order import SPSAOptimizer, SPSASettings, perturbation, replay

TARGET = torch.linspace(-1.0, 1.0, 10)


def sphere(candidates: torch.Tensor) -> torch.Tensor:
    return ((candidates - TARGET) ** 2).sum(1)


def test_cmaes_finds_the_minimum_of_a_shifted_sphere():
    settings = CMAESSettings(popsize=10, sigma=0.5, budget=10 * 3 * 150)
    result = CMAESOptimizer(settings).run(torch.zeros(10), sphere, examples_per_candidate=3, seed=0)
    assert float((result.mean - TARGET).norm()) < 1e-3
    assert result.stats.queries == result.stats.steps * 10 * 3
    assert result.population.shape == (10, 10) and result.losses.shape == (10,)
    assert result.sigmas.shape == (result.stats.steps,) and result.sigmas[0] == 0.5
    assert result.parents == 5  # pycma's default μ = λ // 2


def test_cmaes_is_seeded_and_warm_started():
    def run(seed: int, x0: torch.Tensor):
        settings = CMAESSettings(popsize=6, sigma=0.1, budget=6 * 2)
        return CMAESOptimizer(settings).run(x0, sphere, examples_per_candidate=1, seed=seed)

    a, b, c = run(1, TARGET), run(1, TARGET), run(2, TARGET)
    assert torch.equal(a.population, b.population) and not torch.equal(a.population, c.population)
    # the first generation is drawn around the warm start x0 with step σ
    assert float((a.population - TARGET).abs().max()) < 0.1 * 5
    assert float((a.mean - TARGET).norm()) < 0.2


def test_cmaes_stops_on_pycma_rules_instead_of_restarting():
    settings = CMAESSettings(popsize=8, sigma=0.5, budget=8 * 5000)
    result = CMAESOptimizer(settings).run(torch.zeros(10), sphere, examples_per_candidate=1, seed=0)
    assert result.stopped and result.stats.steps < 5000
    assert float((result.mean - TARGET).norm()) < 1e-4  # the converged mean, not a fresh restart at 0


def test_cmaes_errors_surface():
    optimizer = CMAESOptimizer(CMAESSettings(popsize=4, sigma=1.0, budget=40))

    def broken(candidates: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the model is down")

    with pytest.raises(RuntimeError, match="the model is down"):
        optimizer.run(torch.zeros(3), broken, examples_per_candidate=1, seed=0)
    with pytest.raises(FloatingPointError, match="1 of 4 candidate losses are not finite"):
        optimizer.run(
            torch.zeros(3),
            lambda z: torch.tensor([1.0, math.nan, 2.0, 3.0]),
            examples_per_candidate=1,
            seed=0,
        )
    with pytest.raises(ValueError, match=r"returned \(3,\) at generation 0, expected \(4,\)"):
        optimizer.run(torch.zeros(3), lambda z: torch.zeros(3), examples_per_candidate=1, seed=0)
    with pytest.raises(ValueError, match="less than one generation: popsize 4 × 20 examples = 80"):
        optimizer.run(torch.zeros(3), sphere, examples_per_candidate=20, seed=0)
    with pytest.raises(ValueError, match="popsize must be at least 2"):
        CMAESSettings(popsize=1)


def test_recombination_weights_are_pycmas_for_mu_equal_lambda():
    weights = recombination_weights(3)
    raw = torch.tensor([math.log(3.5) - math.log(i) for i in (1, 2, 3)], dtype=torch.float64)
    torch.testing.assert_close(weights, raw / raw.sum())
    assert torch.equal(recombination_weights(1), torch.ones(1, dtype=torch.float64))


def test_cma_tell_recombines_ranked_solutions_exactly():
    state = CMAState.initial(torch.zeros(2), sigma=2.0)
    solutions = torch.tensor([[1.0, 0.0], [0.0, 4.0], [2.0, 2.0]])
    losses = torch.tensor([3.0, 1.0, 2.0])  # ranks: row 1, row 2, row 0
    new = cma_tell(state, solutions, losses)
    w = recombination_weights(3)
    expected = w[0] * solutions[1] + w[1] * solutions[2] + w[2] * solutions[0]
    torch.testing.assert_close(new.mean, expected.double())
    assert new.generation == 1
    torch.testing.assert_close(new.cov, new.cov.T)
    assert float(torch.linalg.eigvalsh(new.cov).min()) > 0


def test_cma_tell_shrinks_sigma_exactly_when_nothing_moves():
    d = 4
    state = CMAState.initial(torch.ones(d), sigma=1.5)
    new = cma_tell(state, torch.ones(3, d), torch.tensor([0.1, 0.2, 0.3]))
    mu_eff = 1 / float((recombination_weights(3) ** 2).sum())
    c_sigma = (mu_eff + 2) / (d + mu_eff + 5)
    d_sigma = 1 + c_sigma  # √((μ_eff − 1)/(d + 1)) < 1 here
    assert new.sigma == pytest.approx(1.5 * math.exp(-c_sigma / d_sigma), rel=1e-12)
    torch.testing.assert_close(new.mean, state.mean)


def test_cma_tell_iterated_solves_an_ill_conditioned_ellipsoid():
    d, generator = 6, torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0 ** (2 * i / (d - 1)) for i in range(d)], dtype=torch.float64)
    state = CMAState.initial(torch.ones(d), sigma=0.5)
    for _ in range(400):
        values, basis = torch.linalg.eigh(state.cov)
        root = basis @ torch.diag(values.clamp(min=0).sqrt()) @ basis.T
        samples = (
            state.mean + state.sigma * torch.randn(8, d, generator=generator, dtype=torch.float64) @ root.T
        )
        state = cma_tell(state, samples, ((samples * scales) ** 2).sum(1))
    assert float(((state.mean * scales) ** 2).sum()) < 1e-8


def test_cma_state_round_trips_and_rejects_bad_tensors():
    state = cma_tell(CMAState.initial(torch.zeros(3), 1.0), torch.randn(4, 3), torch.rand(4))
    again = CMAState.from_tensors(state.to_tensors())
    for name in ("mean", "cov", "path_sigma", "path_cov"):
        assert torch.equal(getattr(again, name), getattr(state, name))
    assert (again.sigma, again.generation) == (state.sigma, state.generation)
    tensors = state.to_tensors()
    with pytest.raises(ValueError, match=r"'cov' has shape \(2, 2\), expected \(3, 3\)"):
        CMAState.from_tensors({**tensors, "cov": torch.eye(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="'sigma' holds non-finite"):
        CMAState.from_tensors({**tensors, "sigma": torch.tensor([math.inf], dtype=torch.float64)})
    with pytest.raises(ValueError, match="step size must be a positive number"):
        CMAState.from_tensors({**tensors, "sigma": torch.tensor([-1.0], dtype=torch.float64)})
    with pytest.raises(ValueError, match="4 solutions but 3 losses"):
        cma_tell(state, torch.randn(4, 3), torch.rand(3))


def test_spsa_decreases_a_quadratic_and_replays_from_seeds():
    curvature = torch.linspace(0.5, 2.0, 20)

    def quadratic(candidates: torch.Tensor) -> torch.Tensor:
        return (curvature * (candidates - 1.0) ** 2).sum(1)

    x0 = torch.zeros(20)
    settings = SPSASettings(lr=0.02, epsilon=1e-3, budget=2 * 4 * 300)
    result = SPSAOptimizer(settings).run(x0, quadratic, examples_per_candidate=4, seed=7)
    start, end = float(quadratic(x0[None])[0]), float(quadratic(result.params[None])[0])
    assert end < 0.1 * start
    assert result.stats.steps == 300 and result.stats.queries == 2 * 4 * 300
    assert torch.equal(replay(x0, 7, result.projected_grads, settings.lr), result.params)
    assert torch.equal(perturbation(7, 3, 20), perturbation(7, 3, 20))
    assert not torch.equal(perturbation(7, 3, 20), perturbation(7, 4, 20))
    with pytest.raises(FloatingPointError, match="not finite"):
        SPSAOptimizer(settings).run(
            x0, lambda z: torch.tensor([math.nan, 0.0]), examples_per_candidate=4, seed=0
        )
    with pytest.raises(ValueError, match="less than one SPSA step"):
        SPSAOptimizer(SPSASettings(budget=3)).run(x0, quadratic, examples_per_candidate=2, seed=0)
