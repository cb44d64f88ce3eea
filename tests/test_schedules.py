"""Learning-rate schedules over rounds: pure functions of the round, against hand values and torch's
own schedulers, from config to the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from fedprompt.config import GradientOptimizerConfig
from fedprompt.federation.instructions import FitInstructions
from fedprompt.training.gradient import GradientTrainer, LocalRound, round_schedule
from optimizers.gradient import GradientSettings
from optimizers.schedules import RoundSchedule


def test_coop_cosine_with_one_constant_warmup_round():
    """CoOp: SGD lr 0.002, cosine over the run, one warmup epoch at 1e-5 (Dassl: the cosine counts
    from 0 after the warmup)."""
    config = GradientOptimizerConfig(
        algorithm="sgd",
        lr=0.002,
        schedule={"kind": "cosine", "warmup_rounds": 1, "warmup": "constant", "warmup_lr": 1e-5},
    )
    schedule = round_schedule(config, rounds=4)
    lrs = [0.002 * schedule.factor(r) for r in range(1, 5)]
    assert lrs[0] == pytest.approx(1e-5, rel=1e-12)
    assert lrs[1] == 0.002
    assert lrs[2] == pytest.approx(0.002 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert lrs[3] == pytest.approx(0.001, rel=1e-12)


def test_cosine_matches_torch_cosine_annealing_per_round():
    schedule = RoundSchedule(kind="cosine", horizon=6, min_factor=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6, eta_min=0.2)
    for round_num in range(1, 7):
        assert 2.0 * schedule.factor(round_num) == pytest.approx(torch_schedule.get_last_lr()[0], rel=1e-9)
        optimizer.step()
        torch_schedule.step()
    assert schedule.factor(7) == schedule.factor(100) == pytest.approx(0.1)  # held at the floor


def test_step_and_exponential_decay_by_hand():
    step = RoundSchedule(kind="step", gamma=0.5, step_rounds=2)
    assert [step.factor(r) for r in range(1, 6)] == [1, 1, 0.5, 0.5, 0.25]
    exponential = RoundSchedule(
        kind="exponential", gamma=0.5, warmup_rounds=2, warmup="linear", warmup_factor=0.5
    )
    assert [exponential.factor(r) for r in range(1, 6)] == [0.5, 0.75, 1, 0.5, 0.25]


def test_a_schedule_is_a_pure_function_of_the_round():
    schedule = RoundSchedule(kind="cosine", horizon=5, warmup_rounds=1, warmup_factor=0.01)
    first = [schedule.factor(r) for r in (3, 1, 5, 2)]
    assert first == [schedule.factor(r) for r in (3, 1, 5, 2)]  # no hidden state, any order
    with pytest.raises(ValueError, match="rounds count from 1"):
        schedule.factor(0)


def test_no_schedule_for_a_constant_learning_rate():
    assert round_schedule(GradientOptimizerConfig(), rounds=10) is None
    pinned = round_schedule(GradientOptimizerConfig(lr=0.1, schedule={"kind": "cosine", "rounds": 20}), 5)
    assert pinned.horizon == 20  # pinned: a resume that adds rounds keeps the same schedule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "linear"}, "schedule kind"),
        ({"gamma": 0}, "gamma"),
        ({"horizon": 0}, "horizon"),
        ({"min_factor": 2}, "min_factor"),
    ],
)
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoundSchedule(**kwargs)


def test_the_trainer_runs_each_round_at_its_factor(monkeypatch):
    """GradientTrainer hands the optimiser the factor of the instructions' round for every step."""
    schedule = RoundSchedule(kind="step", gamma=0.5)
    trainer = GradientTrainer(optimizer=None, batch_size=4, device="cpu", schedule=schedule)
    seen = []

    class Recorder:
        settings = GradientSettings()

        def run(self, params, loss_fn, batches, lr_factor=None, resume=None):
            seen.append([lr_factor(step) for step in range(3)])

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

    trainer.optimizer = Recorder()
    for round_num in (1, 3):
        trainer.train(Module(), data=None, local=LocalRound(FitInstructions(round=round_num, seed=0)))
    assert seen == [[1.0, 1.0, 1.0], [0.25, 0.25, 0.25]]
