"""FeS's co-planner (pseudo_labels.co_planning): its choice and cost against hand computations,
only the chosen top layers of a deep prompt changing in a round (the others bit for bit), the
planner's records resumed exactly, and the configurations it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.federation.instructions import FitInstructions
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.co_planning import PREFIX, Plan, PlannerRecords, candidates, layer_passes
from fedprompt.training.config import CoPlanningConfig
from prompt_modules.soft_prompt import DeepPrompt, PrefixPrompt

from conftest import tiny_run_config, write_keyword_dataset

DEEP = {"kind": "deep", "mode": "prefix", "num_tokens": 4, "init": "random", "init_std": 0.9}
GRID = {"depths": [1, 2], "capacities": [0.1, 0.3]}


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _raw(keyword_file, grid=GRID, **sections):
    raw = tiny_run_config(keyword_file, data={"labelled_per_class": 3}, prompt=DEEP, **sections)
    return {**raw, "pseudo_labels": {"co_planning": grid}}


def test_the_grid_and_the_cost_by_hand():
    grid = candidates(CoPlanningConfig(**GRID))
    assert grid == [Plan(1, 0.1), Plan(1, 0.3), Plan(2, 0.1), Plan(2, 0.3)]
    # 10 forward-only passes through 2 layers, 30 training passes: 2 forward + 2 x 1 backward layers
    assert layer_passes(10, 30, 2, 1) == 10 * 2 + 30 * (2 + 2 * 1) == 140


def test_the_planner_profiles_each_candidate_then_takes_the_best_gain_per_cost():
    """Four candidates with made-up scores and costs: rounds 1-4 try them in grid order; each next
    round credits the one in flight with (score − its starting score) / its cost; round 5 takes the
    highest of 0.06/100, 0.04/400, 0.02/200 and −0.01/50, candidate 0."""
    records = PlannerRecords.fresh(4)
    assert records.observe(0.5) is None  # nothing in flight yet
    rounds = [(0.50, 100.0), (0.56, 400.0), (0.60, 200.0), (0.62, 50.0)]
    for expected, (score, cost) in enumerate(rounds):
        gain = records.observe(score)
        assert records.choose() == expected
        if expected:
            assert gain == pytest.approx(score - rounds[expected - 1][0])
        records.begin(expected, score, cost)
    assert records.observe(0.61) == pytest.approx(-0.01)
    assert records.ratios == pytest.approx([0.06 / 100, 0.04 / 400, 0.02 / 200, -0.01 / 50])
    assert records.choose() == 0
    # equal ratios go to the earlier candidate; a fall in score ranks below any rise
    assert PlannerRecords([-1e-4, 2e-4, 2e-4, 1e-5]).choose() == 1
    # the records travel as float64 client state and come back the same
    again = PlannerRecords.from_state(records.to_state(), 4)
    assert again == records
    assert PlannerRecords.from_state({}, 3).ratios == [None] * 3
    with pytest.raises(ValueError, match="grid of 6 candidates"):
        PlannerRecords.from_state(records.to_state(), 6)


@pytest.mark.parametrize("kind", [DeepPrompt, PrefixPrompt])
def test_held_layers_get_no_gradient(kind):
    shape = (3, 4, 8) if kind is DeepPrompt else (3, 2, 2, 4, 4)
    prompt = kind(torch.randn(shape), start_layer=1)
    assert prompt.prompted_layers == (1, 2, 3)
    prompt.held_layers = 2
    out = prompt()
    tensor = out.layers if kind is DeepPrompt else out.prefix
    assert torch.equal(tensor, prompt.layer_parameter)  # the same values
    tensor.sum().backward()
    grad = prompt.layer_parameter.grad
    assert not grad[:2].any() and bool((grad[2] == 1).all())
    prompt.held_layers = 3
    with pytest.raises(ValueError, match="trains at least one"):
        prompt()


def test_a_round_trains_only_the_planned_top_layers_at_the_planned_capacity(keyword_file):
    """Client 0 carries records that favour (depth 1, capacity 0.3): its round trains the top layer
    only (layer 0's prefix comes back bit for bit), admits pseudo-labels at pace 0.3 and reports the
    plan, its cost by hand (2 layers, no cache: 2 forward and 1 backward layer per training pass)
    and the gain of the round in flight."""
    experiment = build_experiment(load_config(_raw(keyword_file)))
    client = experiment.clients[0]
    state = experiment.initial_state()
    carried = PlannerRecords([1e-4, 3e-4, 2e-4, -1e-4], last=3, last_score=0.25, last_cost=80.0).to_state()
    result = client.fit(state, FitInstructions(round=2, seed=7), carried)
    trained, start = result.update.state["prompt.prefix"], state["prompt.prefix"]
    assert torch.equal(trained[0], start[0])
    assert not torch.equal(trained[1], start[1])
    metrics = result.update.metrics
    assert (metrics["plan_depth"], metrics["plan_capacity"]) == (1.0, 0.3)
    unlabelled, labelled = len(client.unlabelled_data), len(client.train_data)
    assert 0 < metrics["pseudo_labels"] <= math.floor(0.3 * 2 * unlabelled)
    assert metrics["plan_cost"] == (unlabelled + labelled) * 2 + metrics["examples_seen"] * (2 + 2 * 1)
    assert metrics["plan_gain"] == pytest.approx(metrics["plan_score"] - 0.25)
    records = PlannerRecords.from_state(result.carried, 4)
    assert records.ratios[3] == pytest.approx(metrics["plan_gain"] / 80.0)
    assert (records.last, records.last_score, records.last_cost) == (
        1,
        metrics["plan_score"],
        metrics["plan_cost"],
    )
    assert set(result.carried) == {
        PREFIX + "ratios",
        PREFIX + "tried",
        PREFIX + "last",
    }  # records only: no labels
    assert set(result.update.state) == {"prompt.prefix"}


def test_co_planning_refusals(keyword_file):
    with pytest.raises(ConfigError, match=r"no layers to choose from\. Use prompt\.kind deep"):
        load_config({**_raw(keyword_file), "prompt": {"kind": "soft", "num_tokens": 4}})
    with pytest.raises(ConfigError, match="cannot train in a prompt of 1 layers"):
        load_config({**_raw(keyword_file), "prompt": {**DEEP, "layers": [1]}})
    with pytest.raises(ConfigError, match="distinct paces in"):
        load_config(_raw(keyword_file, {"depths": [1], "capacities": [0.0]}))
    with pytest.raises(ConfigError, match="distinct layer counts"):
        load_config(_raw(keyword_file, {"depths": [1, 1], "capacities": [0.1]}))
    # no pseudo-labels (and so no co-planning) without few-shot clients
    with pytest.raises(ConfigError, match=r"set data\.labelled_per_class"):
        load_config({**_raw(keyword_file), "data": tiny_run_config(keyword_file)["data"]})
    # three layers in a two-layer model: refused from the model's shape before any training
    with pytest.raises(ConfigError, match="cannot train in a prompt of 2 layers"):
        build_experiment(load_config(_raw(keyword_file, {"depths": [3], "capacities": [0.1]})))


@pytest.mark.slow
def test_a_planned_run_keeps_held_layers_and_resumes_its_plans_exactly(keyword_file, tmp_path):
    """Depth 1 only: after two rounds of FedAvg the global prefix of layer 0 is still the initial
    one, bit for bit. The full grid: four rounds straight and two rounds resumed to four give the same
    plans, the same final prompt and the same carried records."""
    top_only = _raw(keyword_file, {"depths": [1], "capacities": [0.2]}, federation={"rounds": 2})
    initial = build_experiment(load_config(top_only)).initial_state()["prompt.prefix"]
    final = fedprompt.run(top_only, write=False).final_state["prompt.prefix"]
    assert torch.equal(final[0], initial[0]) and not torch.equal(final[1], initial[1])

    straight = fedprompt.run(_raw(keyword_file), output_dir=tmp_path / "a")
    partial = fedprompt.run(_raw(keyword_file, federation={"rounds": 2}), output_dir=tmp_path / "b")
    resumed = fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=4"])
    assert torch.equal(resumed.final_state["prompt.prefix"], straight.final_state["prompt.prefix"])

    def plans(result):
        return [
            (r["round"], r["client_id"], r["plan_depth"], r["plan_capacity"], r.get("plan_gain"))
            for r in result.client_history
            if r["event"] == "fit"
        ]

    assert plans(resumed) == plans(straight)
    chosen = {(depth, capacity) for _, _, depth, capacity, _ in plans(straight)}
    assert chosen == {(1.0, 0.1), (1.0, 0.3), (2.0, 0.1), (2.0, 0.3)}  # four rounds: each profiled once
    a = load_file(straight.run_dir / "checkpoint.safetensors")
    b = load_file(resumed.run_dir / "checkpoint.safetensors")
    records = sorted(k for k in a if "/co_plan/" in k)
    assert records == sorted(f"client/{c}/co_plan/{n}" for c in range(4) for n in ("ratios", "tried", "last"))
    for key in records:
        assert torch.equal(a[key], b[key]), key
