"""Zeroth-order training of any text prompt (SPSA/MeZO in place) and the black-box scoring options:
every generation on the whole local set, a fixed number of generations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedprompt.config import ConfigError, load_config
from fedprompt.federation.instructions import FitInstructions
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.batching import TensorData
from fedprompt.training.blackbox import CMAESTrainer, SPSATrainer
from fedprompt.training.gradient import LocalRound, evaluate
from optimizers.cmaes import CMAESOptimizer, CMAESSettings
from optimizers.zeroth_order import (
    InPlaceSPSA,
    SPSAOptimizer,
    SPSASettings,
    replay_in_place,
    tensor_directions,
)
from prompt_modules.base import population_cross_entropy
from prompt_modules.soft_prompt import PrefixPrompt, SoftPrompt
from prompt_modules.text_classifier import TextPromptClassifier, VerbalizerHead

from conftest import TINY_BERT, tiny_backbone, tiny_run_config, write_keyword_dataset

TEXTS = ["apple river", "car", "banana train plane", "forest", "cherry", "mountain of car", "the apple"]


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _data(clf: TextPromptClassifier) -> TensorData:
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    return TensorData({**clf.encode_texts(TEXTS), "labels": labels})


def _classifier(prompt: torch.nn.Module) -> TextPromptClassifier:
    backbone = tiny_backbone({**TINY_BERT, "initializer_range": 0.3})
    head = VerbalizerHead.from_label_words(backbone, [["bad"], ["good"]])
    return TextPromptClassifier(backbone, prompt, head, "{text} It was [MASK].").eval()


def _local_set_loss(clf: TextPromptClassifier, data: TensorData) -> float:
    batch = next(data.batches(len(data)))
    return float(F.cross_entropy(clf(batch).float(), batch["labels"]))


# ----------------------------------------------------------------------------- SPSA in place


@pytest.mark.parametrize("kind", ["soft", "prefix"])
def test_one_spsa_step_on_a_prompt_is_theta_minus_lr_ghat_u(kind):
    """One step of the in-place trainer against the hand computation on the whole local set:
    ĝ = (L(θ + εu) − L(θ − εu)) / 2ε with u from the step's seed, θ ← θ − η ĝ u."""
    g = torch.Generator().manual_seed(0)
    prompt = (
        SoftPrompt(torch.randn(4, 32, generator=g))
        if kind == "soft"
        else PrefixPrompt(torch.randn(2, 2, 2, 3, 16, generator=g), 0)
    )
    clf = _classifier(prompt)
    data = _data(clf)
    (param,) = list(prompt.parameters())
    theta0 = param.detach().clone()
    lr, eps, seed = 0.3, 0.05, 11
    (u,) = tensor_directions(seed, 0, [param])
    with torch.no_grad():
        losses = []
        for sign in (1, -1):
            param.copy_(theta0 + sign * eps * u)
            losses.append(_local_set_loss(clf, data))
        param.copy_(theta0)
    ghat = (losses[0] - losses[1]) / (2 * eps)
    settings = SPSASettings(lr=lr, epsilon=eps, budget=2 * len(data))  # one step on the local set
    stats = SPSATrainer(SPSAOptimizer(settings), 4, "cpu", "local-set").train(
        clf, data, LocalRound(FitInstructions(1, seed))
    )
    assert stats.steps == 1 and stats.queries == 2 * len(data)
    # fp32: the trainer reaches θ − εu as (θ + εu) − 2εu, so ĝ carries rounding of order 1e-7/ε
    torch.testing.assert_close(param.detach(), theta0 - lr * ghat * u, rtol=1e-4, atol=1e-5)
    assert stats.final_loss == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-5)
    assert param.grad is None and not param.is_inference()  # no graph, and still trainable by gradient
    F.cross_entropy(clf(next(data.batches(7))).float(), torch.zeros(7, dtype=torch.long)).backward()
    assert param.grad is not None


def test_in_place_spsa_replays_bit_for_bit_and_never_copies_the_prompt():
    """The trajectory is the seed and the ĝ: replaying them on θ_0 gives the run's θ exactly; the
    run touches the tensors in place (the same storage) and its perturbations are seeded."""
    tensors = [torch.zeros(5), torch.zeros(2, 3)]
    storages = [t.data_ptr() for t in tensors]
    target = [torch.linspace(-1, 1, 5), torch.ones(2, 3)]

    def step_loss(step: int):
        return lambda: float(sum(((t - c) ** 2).sum() for t, c in zip(tensors, target, strict=True)))

    settings = SPSASettings(lr=0.05, epsilon=1e-2, budget=2 * 200)
    result = InPlaceSPSA(settings).run(tensors, step_loss, examples_per_candidate=1, seed=5)
    assert [t.data_ptr() for t in tensors] == storages
    assert step_loss(0)() < 0.05 * 8.0  # from a loss of 8 at θ = 0
    again = [torch.zeros(5), torch.zeros(2, 3)]
    replay_in_place(again, 5, result.projected_grads, settings.lr, settings.epsilon)
    assert all(torch.equal(a, b) for a, b in zip(again, tensors, strict=True))
    assert torch.equal(result.params, torch.cat([t.reshape(-1) for t in tensors]))
    first = [d.clone() for d in tensor_directions(5, 0, again)]
    assert all(torch.equal(a, b) for a, b in zip(first, tensor_directions(5, 0, again), strict=True))
    assert not torch.equal(first[0], next(tensor_directions(5, 1, again)))
    with pytest.raises(FloatingPointError, match="not finite"):
        InPlaceSPSA(settings).run(tensors, lambda s: lambda: float("nan"), examples_per_candidate=1, seed=0)


def test_spsa_on_a_soft_prompt_of_a_tiny_model_learns(keyword_file):
    """MeZO's case on a tiny random BERT: SPSA alone moves a soft prompt from 0.44 to well above it
    (chance is 1/3) on held-out examples."""
    config = tiny_run_config(
        keyword_file,
        partition={"kind": "iid", "num_clients": 1, "local_val_fraction": 0.0},
        federation={"rounds": 1, "min_clients": 1},
    )
    experiment = build_experiment(load_config(config))
    model, client = experiment.model, experiment.clients[0]
    before = evaluate(model, experiment.test_data, 64, "cpu")["accuracy"]
    settings = SPSASettings(lr=0.1, epsilon=0.01, budget=2 * 16 * 300)
    stats = SPSATrainer(SPSAOptimizer(settings), 16, "cpu").train(
        model, client.train_data, LocalRound(FitInstructions(1, 3))
    )
    after = evaluate(model, experiment.test_data, 64, "cpu")["accuracy"]
    assert stats.steps == 300
    assert after >= 0.55 and after >= before + 0.1, (before, after)


def test_spsa_config_takes_soft_and_deep_prompts_and_refuses_the_rest(keyword_file):
    spsa = {"kind": "spsa", "lr": 0.1, "epsilon": 0.01, "budget": 64, "batch_size": 8}

    def config(prompt: dict, optimizer: dict) -> dict:
        return {**tiny_run_config(keyword_file), "prompt": prompt, "optimizer": optimizer}

    for prompt in ({"kind": "soft"}, {"kind": "deep", "mode": "prefix"}, {"kind": "intrinsic", "dim": 8}):
        assert load_config(config(prompt, spsa)).optimizer.kind == "spsa"
    with pytest.raises(ConfigError, match=r"cmaes' searches an intrinsic prompt's z.*optimizer\.kind: spsa"):
        load_config(config({"kind": "soft"}, {"kind": "cmaes", "budget": 640}))
    remote = {**config({"kind": "soft"}, spsa), "backbone": {"kind": "remote"}}
    with pytest.raises(ConfigError, match=r"backbone\.kind remote scores intrinsic prompts only"):
        load_config(remote)


# ----------------------------------------------------------------------------- scoring options


def test_local_set_scoring_scores_every_candidate_on_every_local_example():
    """score_on local-set: each generation's population loss is the mean cross-entropy over the whole
    local set (hand computation over one batch of all examples), and a run of fixed generations
    costs generations × popsize × N queries, plus N for FedBPT's final score."""
    from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier, ProjectionSpec

    backbone = tiny_backbone({**TINY_BERT, "initializer_range": 0.3})
    head = VerbalizerHead.from_label_words(backbone, [["bad"], ["good"]])
    spec = ProjectionSpec(seed=1, dim=6, num_tokens=2, scale=1.0)
    clf = IntrinsicTextClassifier(
        backbone, IntrinsicPrompt.from_backbone(backbone, spec), head, "{text} It was [MASK].", 3
    ).eval()
    data = _data(clf)
    seen: list[torch.Tensor] = []
    trainer = CMAESTrainer(
        CMAESOptimizer(CMAESSettings(popsize=4, budget=None, fixed_generations=3)),
        batch_size=3,  # the local set of 7 runs as batches of 3, 3 and 1
        device="cpu",
        report_search_state=True,
        score_on="local-set",
    )
    loss, size = trainer._population_loss(clf, data, seed=0)
    candidates = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    whole = next(data.batches(len(data)))
    expected = population_cross_entropy(clf.population_logits(candidates, whole), whole["labels"])
    torch.testing.assert_close(loss(candidates).float(), expected, rtol=1e-5, atol=1e-6)
    assert size == 7

    original = clf.population_losses

    def recording(candidates: torch.Tensor, batch) -> torch.Tensor:
        seen.append(batch["labels"])
        return original(candidates, batch)

    clf.population_losses = recording
    sigma = {"sigma": torch.tensor([1.0])}
    stats = trainer.train(clf, data, LocalRound(FitInstructions(1, 0, extras=sigma)))
    assert stats.steps == 3 and stats.queries == 3 * 4 * 7 + 7
    assert sum(len(labels) for labels in seen) == 4 * 7  # 3 generations and the final score, 7 each


def test_cmaes_length_is_a_budget_or_a_number_of_generations():
    assert CMAESSettings(popsize=5, budget=None, fixed_generations=8).generations(40) == 8
    assert CMAESSettings(popsize=5, budget=1000).generations(40) == 5
    with pytest.raises(ValueError, match="not both"):
        CMAESSettings(budget=100, fixed_generations=2)

    def optimizer(**fields):
        raw = {"prompt": {"kind": "intrinsic"}, "optimizer": {"kind": "cmaes", **fields}}
        return load_config(raw).optimizer

    assert optimizer(generations=8).budget is None and optimizer(generations=8).generations == 8
    assert optimizer(score_on="local-set").score_on == "local-set"
    with pytest.raises(ConfigError, match=r"`budget` .* or `generations`, not both"):
        optimizer(generations=8, budget=99)
