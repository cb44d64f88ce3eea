"""The gradient local optimiser."""

from __future__ import annotations

import math

import pytest
import torch

from optimizers.gradient import GradientOptimizer, GradientSettings


def _regression(n: int = 64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    return x, y


def _batches(x, y, size=16):
    return lambda epoch: ((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))


@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_training_lowers_the_loss(algorithm):
    x, y = _regression()
    w = torch.nn.Parameter(torch.zeros(3))
    lr = 0.05 if algorithm == "adamw" else 0.02

    def loss_fn(batch):
        bx, by = batch
        return ((bx @ w - by) ** 2).mean(), len(by)

    first = loss_fn((x, y))[0].item()
    stats = GradientOptimizer(GradientSettings(algorithm=algorithm, lr=lr, epochs=20, grad_clip=None)).run(
        [w], loss_fn, _batches(x, y)
    )
    assert stats.steps == 80 and stats.examples == 64 * 20
    assert loss_fn((x, y))[0].item() < 0.05 * first
    assert stats.final_loss < stats.mean_loss


def test_max_steps_and_param_groups():
    x, y = _regression()
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))

    def loss_fn(batch):
        bx, by = batch
        return ((bx @ a + b - by) ** 2).mean(), len(by)

    opt = GradientOptimizer(GradientSettings(algorithm="sgd", lr=0.1, momentum=0.0, epochs=5, max_steps=3))
    stats = opt.run([{"params": [a]}, {"params": [b], "lr": 0.0}], loss_fn, _batches(x, y))
    assert stats.steps == 3
    assert b.item() == 0.0 and a.abs().sum() > 0  # the lr-0 group did not move


def test_gradient_clipping_bounds_each_step():
    w = torch.nn.Parameter(torch.zeros(2))

    def loss_fn(batch):
        return (w * torch.tensor([1000.0, 0.0])).sum(), 1

    GradientOptimizer(GradientSettings(algorithm="sgd", lr=1.0, momentum=0.0, grad_clip=0.5)).run(
        [w], loss_fn, lambda e: [None]
    )
    assert math.isclose(w.norm().item(), 0.5, rel_tol=1e-5)


def test_errors_surface():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(FloatingPointError, match="local loss became nan at step 0"):
        GradientOptimizer(GradientSettings()).run(
            [w], lambda b: (torch.tensor(float("nan")), 1), lambda e: [None]
        )
    frozen = torch.zeros(2)
    with pytest.raises(ValueError, match="require grad"):
        GradientOptimizer(GradientSettings()).run([frozen], lambda b: (frozen.sum(), 1), lambda e: [None])
