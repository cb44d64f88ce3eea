"""The server's held-out acceptance test (federation.acceptance): the rows it keeps back, the
decision on hand-made candidates, what a refused round leaves, resume and the Flower runtime."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.data.partition import held_out_split
from fedprompt.errors import DataError
from fedprompt.execution.acceptance import HeldOutAcceptance
from fedprompt.execution.simulation import make_server
from fedprompt.federation.state import Update
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.gradient import evaluate

from conftest import tiny_run_config, write_keyword_dataset


@pytest.fixture(scope="module")
def keywords(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def fedbpt_config(data, rounds: int = 3, **acceptance) -> dict:
    config = tiny_run_config(data, federation={"rounds": rounds, "min_clients": 2})
    config["prompt"] = {"kind": "intrinsic", "dim": 20, "num_tokens": 4}
    config["optimizer"] = {"kind": "cmaes", "popsize": 6, "budget": 6 * 16 * 2, "batch_size": 16}
    config["strategy"] = {"kind": "fedbpt"}
    config["federation"]["acceptance"] = {"held_out_per_class": 4, **acceptance}
    return config


def test_held_out_rows_are_per_class_seeded_and_disjoint_from_the_rest():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    held, rest = held_out_split(labels, 2, seed=7)
    assert np.bincount(labels[held]).tolist() == [2, 2, 2]
    assert sorted(np.concatenate([held, rest]).tolist()) == list(range(len(labels)))
    assert np.array_equal(held, held_out_split(labels, 2, seed=7)[0])
    assert not np.array_equal(held, held_out_split(labels, 2, seed=8)[0])
    with pytest.raises(DataError, match=r"leaves no training example for the clients in classes \[2\]"):
        held_out_split(labels, 3, seed=7)


def test_the_clients_share_the_training_pool_less_the_servers_held_out_rows(keywords):
    plain = fedbpt_config(keywords)
    del plain["federation"]["acceptance"]
    without = build_experiment(load_config(plain))
    experiment = build_experiment(load_config(fedbpt_config(keywords)))
    held = experiment.acceptance_data
    assert len(held) == 4 * 3 and torch.bincount(held.labels).tolist() == [4, 4, 4]

    def pooled(exp) -> int:
        return sum(
            len(c.train_data) + (len(c.val_data) if c.val_data is not None else 0)
            for c in exp.clients.values()
        )

    assert pooled(experiment) == pooled(without) - len(held)
    assert without.acceptance_data is None and len(experiment.test_data) == len(without.test_data)


def _round_with(server, z: torch.Tensor, stage: HeldOutAcceptance, tolerance: float = 0.0):
    """One round in which every sampled client reports ``z`` (an honest FedBPT report otherwise)."""
    stage.tolerance = tolerance
    record = server.begin_round(server.completed_rounds + 1)
    extras = {"loss": 0.5, "sigma_sq_sum": 2.0, "parents": 2.0, "final_sigma": 1.0}
    for cid in record.sampled:
        tensors = {k: torch.tensor([v]) for k, v in extras.items()}
        record.accepted.append(Update(cid, {"prompt.z": z.clone()}, 10, {}, tensors))
    server.aggregate(record)
    return record


def test_a_refused_candidate_leaves_every_piece_of_server_state(keywords, caplog):
    cfg = load_config(fedbpt_config(keywords))
    server = make_server(build_experiment(cfg), cfg)
    stage = next(s for s in server.stages if isinstance(s, HeldOutAcceptance))
    start = {k: v.clone() for k, v in server.global_state.items()}
    _round_with(server, torch.full((20,), 0.5), stage, tolerance=10.0)  # accepted: the global CMA-ES exists
    global_before = {k: v.clone() for k, v in server.global_state.items()}
    strategy_before = {k: v.clone() for k, v in server.strategy.state_dict().items()}
    assert "cma/mean" in strategy_before and not torch.equal(global_before["prompt.z"], start["prompt.z"])

    stage.load_state_dict({"score": torch.tensor([0.0], dtype=torch.float64)})  # nothing beats a loss of 0
    with caplog.at_level(logging.WARNING, logger="fedprompt.server"):
        refused = _round_with(server, torch.full((20,), -0.5), stage)
    assert "CandidateRejected: held-out loss of the new global prompt is" in refused.aggregation_error
    assert refused.stage_metrics["acceptance_accepted"] == 0 and refused.used == []
    assert refused.stage_metrics["acceptance_score"] == 0.0
    assert "the global prompt stays as it was" in caplog.text
    assert torch.equal(server.global_state["prompt.z"], global_before["prompt.z"])
    after = server.strategy.state_dict()
    assert sorted(after) == sorted(strategy_before)
    assert all(torch.equal(after[k], v) for k, v in strategy_before.items())
    assert stage.current == 0.0

    stage.load_state_dict({})  # the next round goes on from the restored global CMA-ES
    again = _round_with(server, torch.full((20,), -0.5), stage, tolerance=10.0)
    assert again.aggregation_error is None and again.stage_metrics["acceptance_accepted"] == 1


def test_the_decision_is_the_held_out_loss_of_the_candidate_against_the_current(keywords):
    config = fedbpt_config(keywords)
    config["strategy"] = {"kind": "fedbpt", "rule": "mean", "sigma_decay": 0.5}  # the candidate is the z sent
    cfg = load_config(config)
    experiment = build_experiment(cfg)
    server = make_server(experiment, cfg)
    stage = next(s for s in server.stages if isinstance(s, HeldOutAcceptance))

    def held_out_loss(z: torch.Tensor) -> float:
        experiment.model.load_state_dict(experiment.full_state({"prompt.z": z}), strict=True)
        return evaluate(experiment.model, experiment.acceptance_data, 64, experiment.device)["loss"]

    zero = held_out_loss(torch.zeros(20))
    candidates = [torch.randn(20, generator=torch.Generator().manual_seed(s)) * 3 for s in range(20)]
    worse = next(z for z in candidates if held_out_loss(z) > zero)
    better = next(z for z in candidates if held_out_loss(z) < zero)

    refused = _round_with(server, worse, stage)
    assert refused.stage_metrics["acceptance_candidate_score"] == pytest.approx(held_out_loss(worse))
    assert refused.stage_metrics["acceptance_score"] == pytest.approx(zero)
    assert refused.aggregation_error is not None and server.strategy.sigma == 1.0  # the σ schedule waited
    accepted = _round_with(server, better, stage)
    assert accepted.aggregation_error is None and server.strategy.sigma == 0.5
    assert torch.equal(server.global_state["prompt.z"], better)
    assert stage.current == pytest.approx(held_out_loss(better))


def test_an_accuracy_score_refuses_a_lower_accuracy_beyond_the_tolerance(keywords):
    config = fedbpt_config(keywords, score="accuracy")
    config["strategy"] = {"kind": "fedbpt", "rule": "mean"}
    cfg = load_config(config)
    server = make_server(build_experiment(cfg), cfg)
    stage = next(s for s in server.stages if isinstance(s, HeldOutAcceptance))
    stage.load_state_dict({"score": torch.tensor([1.0], dtype=torch.float64)})  # a perfect current prompt
    refused = _round_with(server, torch.zeros(20), stage)
    assert "held-out accuracy of the new global prompt is 0.333333 against 1" in refused.aggregation_error
    within = _round_with(server, torch.zeros(20), stage, tolerance=0.7)  # 1/3 ≥ 1 − 0.7
    assert within.aggregation_error is None and stage.current == pytest.approx(1 / 3)


def test_a_run_with_acceptance_never_lets_the_held_out_loss_rise_and_resumes_exactly(keywords, tmp_path):
    config = fedbpt_config(keywords, rounds=4)
    config["optimizer"].update(
        batch_size=2, budget=6 * 2 * 2
    )  # noisy local searches: some rounds get refused
    straight = fedprompt.run(config, write=False)
    decisions = [row["acceptance_accepted"] for row in straight.history[1:]]
    assert 0 in decisions and 1 in decisions, decisions
    scores = [row["acceptance_score"] for row in straight.history[1:]]
    assert all(b <= a for a, b in itertools.pairwise(scores)), scores
    for row in straight.history[1:]:
        if row["acceptance_accepted"]:
            assert row["acceptance_score"] == row["acceptance_candidate_score"]
        else:
            assert "held-out loss" in row["aggregation_error"]

    first = fedprompt.run(
        {**config, "federation": {**config["federation"], "rounds": 1}}, output_dir=tmp_path
    )
    resumed = fedprompt.run(resume=first.run_dir, overrides=["federation.rounds=4"])
    assert torch.equal(straight.final_state["prompt.z"], resumed.final_state["prompt.z"])
    assert [r["acceptance_score"] for r in resumed.history[1:]] == scores


def test_acceptance_is_refused_where_it_cannot_hold(keywords):
    config = fedbpt_config(keywords)
    with pytest.raises(ConfigError, match="spent privacy, which undoing the round would leave uncounted"):
        load_config({**config, "privacy": {"kind": "local", "clip_norm": 1.0, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="held_out_per_class"):
        load_config({**config, "federation": {"acceptance": {"held_out_per_class": 0}}})
