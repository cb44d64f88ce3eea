"""Personal prompts: split prompts whose local part never leaves its client, reliability-weighted
aggregation, the fine-tuning baseline, and the per-client metrics."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.federation.client_rules import RoundInputs
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.personalization import LOCAL_PREFIX, PromptSplit, build_split
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.federation.strategies.reliability import ReliabilityRule, ReliabilityWeighted
from fedprompt.federation.strategies.server_tensors import flatten

from conftest import tiny_run_config, write_keyword_dataset


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


# --------------------------------------------------------------------------- the split itself

INITIAL = {
    "text.context": torch.arange(12.0).reshape(4, 3),
    "image.patch": torch.full((3, 2, 2), 7.0),
    "text.scale": torch.tensor([0.5]),
}


def test_split_sends_the_shared_rows_and_keeps_the_rest_local():
    split = PromptSplit(INITIAL, local_names={"image.patch"}, shared_rows={"text.context": 1})
    wire = split.wire(INITIAL)
    assert sorted(wire) == ["text.context", "text.scale"]
    assert torch.equal(wire["text.context"], torch.tensor([[0.0, 1.0, 2.0]]))
    local = split.local(INITIAL)
    assert sorted(local) == [LOCAL_PREFIX + "image.patch", LOCAL_PREFIX + "text.context"]
    assert torch.equal(local[LOCAL_PREFIX + "text.context"], INITIAL["text.context"][1:])
    trained_wire = {"text.context": torch.full((1, 3), -1.0), "text.scale": torch.tensor([2.0])}
    carried = {
        LOCAL_PREFIX + "image.patch": torch.zeros(3, 2, 2),
        LOCAL_PREFIX + "text.context": torch.ones(3, 3),
    }
    full = split.join(trained_wire, carried)
    assert torch.equal(full["text.context"], torch.cat([torch.full((1, 3), -1.0), torch.ones(3, 3)]))
    assert torch.equal(full["image.patch"], torch.zeros(3, 2, 2))
    assert torch.equal(split.join(trained_wire, {})["image.patch"], INITIAL["image.patch"])  # a new client


@pytest.mark.parametrize(
    ("local", "shared", "match"),
    [
        (["vision.*"], None, r"\['vision\.\*'\] match no prompt tensor"),
        (["*"], None, "nothing would be aggregated"),
        ([], 4, "sharing 4 must leave at least one shared and one local"),
        (["text.*"], 2, "no token tensors to split"),
    ],
)
def test_split_mistakes_are_named(local, shared, match):
    with pytest.raises(ValueError, match=match):
        build_split(INITIAL, ["text.context"], local, shared)


def test_personal_prompts_need_held_out_splits_and_gradients():
    with pytest.raises(ConfigError, match="local_val_fraction > 0"):
        load_config(None, ["personalization.shared_tokens=4", "partition.local_val_fraction=0"])
    with pytest.raises(ConfigError, match="train by gradient"):
        load_config(
            {
                "strategy": {"kind": "reliability"},
                "optimizer": {"kind": "cmaes"},
                "prompt": {"kind": "intrinsic"},
            }
        )


# --------------------------------------------------------------------------- split runs


def _split_config(keyword_file, rounds=3, **extra):
    return tiny_run_config(
        keyword_file,
        partition={"kind": "dirichlet", "alpha": 0.3, "min_partition_size": 10, "local_val_fraction": 0.3},
        federation={"rounds": rounds},
        personalization={"shared_tokens": 4},
        **extra,
    )


def test_a_split_prompt_aggregates_only_its_shared_rows(keyword_file, monkeypatch):
    seen = []
    original = FedAvg._aggregate

    def spy(self, global_state, updates):
        seen.append(
            [(u.client_id, {k: v.clone() for k, v in u.state.items()}, u.num_examples) for u in updates]
        )
        return original(self, global_state, updates)

    monkeypatch.setattr(FedAvg, "_aggregate", spy)
    result = fedprompt.run(_split_config(keyword_file), write=False)
    assert result.final_state["prompt.embeddings"].shape == (4, 32)  # 4 of the 8 vectors travel
    last = seen[-1]
    assert all(state["prompt.embeddings"].shape == (4, 32) for _, state, _ in last)
    total = sum(n for _, _, n in last)
    expected = sum(state["prompt.embeddings"].double() * n for _, state, n in last) / total
    assert torch.equal(result.final_state["prompt.embeddings"], expected.float())
    row = result.history[-1]
    for key in ("personal_accuracy_mean", "personal_accuracy_worst", "local_accuracy_mean"):
        assert 0 <= row[key] <= 1
    assert row["personal_accuracy_worst"] <= row["personal_accuracy_mean"]
    evaluations = [r for r in result.client_history if r["event"] == "evaluate" and r["round"] == 3]
    assert [r["client_id"] for r in evaluations] == [0, 1, 2, 3]
    assert all("personal_accuracy" in r for r in evaluations)
    mean = sum(r["personal_accuracy"] for r in evaluations) / 4
    assert row["personal_accuracy_mean"] == pytest.approx(mean)


def test_local_parts_survive_rounds_and_a_resume_bit_exactly(keyword_file, tmp_path):
    straight = fedprompt.run(_split_config(keyword_file, rounds=3), output_dir=tmp_path / "a")
    partial = fedprompt.run(_split_config(keyword_file, rounds=1), output_dir=tmp_path / "b")
    resumed = fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=3"])
    assert torch.equal(resumed.final_state["prompt.embeddings"], straight.final_state["prompt.embeddings"])
    a = load_file(straight.run_dir / "checkpoint.safetensors")
    b = load_file(resumed.run_dir / "checkpoint.safetensors")
    local = sorted(k for k in a if k.startswith("client/"))
    assert local == [f"client/{c}/local/prompt.embeddings" for c in range(4)]
    assert sorted(k for k in b if k.startswith("client/")) == local
    for key in local:
        assert a[key].shape == (4, 32) and torch.equal(a[key], b[key])
    assert not torch.equal(a[local[0]], a[local[1]])  # each client's own local part
    assert [r["personal_accuracy_mean"] for r in resumed.history] == [
        r["personal_accuracy_mean"] for r in straight.history
    ]
    changes = [json.loads(line) for line in (partial.run_dir / "resumes.jsonl").read_text().splitlines()]
    assert changes[-1]["changes"] == {"federation.rounds": [1, 3]}


def test_a_resume_that_changes_the_run_is_refused(keyword_file, tmp_path):
    partial = fedprompt.run(_split_config(keyword_file, rounds=1), output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.1 -> 0\.5"):
        fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=2", "optimizer.lr=0.5"])
    text = (partial.run_dir / "config.yaml").read_text()
    (partial.run_dir / "config.yaml").write_text(text.replace("lr: 0.1", "lr: 0.2"))
    with pytest.raises(ConfigError, match="was changed after the checkpoint was written"):
        fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=2"])


def test_fine_tuning_baseline_is_reported_per_client(keyword_file):
    config = tiny_run_config(
        keyword_file,
        federation={"rounds": 1},
        personalization={"finetune_steps": 3},
    )
    result = fedprompt.run(config, write=False)
    assert 0 <= result.history[-1]["finetuned_accuracy_mean"] <= 1
    rows = [r for r in result.client_history if r["event"] == "evaluate"]
    assert all("finetuned_accuracy" in r for r in rows) and "personal_accuracy" not in rows[0]


# --------------------------------------------------------------------------- reliability weighting


def _upd(cid, values, accuracy):
    return Update(cid, {"p": torch.tensor(values)}, 10, {"val_accuracy": accuracy})


def test_reliability_weights_and_shared_prompts_match_a_hand_computation():
    strategy = ReliabilityWeighted()
    updates = [_upd(0, [1.0, 0.0], 0.8), _upd(1, [1.0, 1.0], 0.5), _upd(2, [-1.0, 0.0], 0.9)]
    out = strategy.aggregate({"p": torch.zeros(2)}, updates)
    c01 = 1 / 2**0.5  # cos(p0, p1); cos(p0, p2) = -1 -> 0; cos(p1, p2) = -1/sqrt(2) -> 0
    w = torch.tensor([0.8 * c01 / 2, 0.5 * c01 / 2, 0.9 * 0.0], dtype=torch.float64)
    w = w / w.sum()
    expected = w[0] * torch.tensor([1.0, 0.0]) + w[1] * torch.tensor([1.0, 1.0])
    assert torch.allclose(out["p"], expected.float())
    assert strategy.report()["reliability_weights"]["2"] == 0.0  # an irrelevant client counts nothing
    # client 0's shared prompt: only client 1 agrees with it
    assert torch.allclose(strategy.downlink_state(0, out)["p"], torch.tensor([1.0, 1.0]))
    # client 1's: clients 0 (cos 1/sqrt 2, acc .8) and 2 (cos 0)
    assert torch.allclose(strategy.downlink_state(1, out)["p"], torch.tensor([1.0, 0.0]))
    assert torch.equal(strategy.downlink_state(7, out)["p"], out["p"])  # unknown client: the global prompt
    restored = ReliabilityWeighted()
    restored.load_state_dict(strategy.state_dict())
    assert torch.equal(restored.downlink_state(1, out)["p"], strategy.downlink_state(1, out)["p"])


def _vqa_like(cid, prompt, fusion, accuracy=0.6):
    state = {"question.context": torch.tensor(prompt), "fusion.mlp.0.weight": torch.tensor(fusion)}
    return Update(cid, state, 10, {"val_accuracy": accuracy})


def test_reliability_compares_prompt_tensors_only_so_a_different_head_keeps_full_weight():
    # three clients with the same prompt; client 2's fusion head points elsewhere (and outweighs it)
    updates = [
        _vqa_like(0, [1.0, 2.0], [5.0, 0.0, 0.0, 0.0]),
        _vqa_like(1, [1.0, 2.0], [5.0, 0.0, 0.0, 0.0]),
        _vqa_like(2, [1.0, 2.0], [0.0, -9.0, 9.0, 0.0]),
    ]
    state = {"question.context": torch.zeros(2), "fusion.mlp.0.weight": torch.zeros(4)}
    strategy = ReliabilityWeighted(prompt_tensors={"question.context", "answer.context"})
    strategy.initialize(state)
    strategy.aggregate(state, updates)
    assert strategy.report()["reliability_weights"] == pytest.approx({"0": 1 / 3, "1": 1 / 3, "2": 1 / 3})
    # client 0's shared prompt mixes 1 and 2 alike: their prompts agree with its own as much
    shared = strategy.downlink_state(0, state)
    assert torch.allclose(shared["fusion.mlp.0.weight"], torch.tensor([2.5, -4.5, 4.5, 0.0]))
    # over the whole state (the old rule), the head decides: client 2 disagrees and counts nothing
    whole = ReliabilityWeighted()
    whole.initialize(state)
    whole.aggregate(state, updates)
    assert whole.report()["reliability_weights"]["2"] < 0.1  # 1/3 over the prompt alone
    # the pull on the client reads the prompt alone: same prompt, other head, no penalty
    rule = ReliabilityRule(alpha=1.0, prompt_tensors={"question.context"})
    penalty = rule.penalty(RoundInputs(shared, {}, FitInstructions(0, 0)))
    own = {
        "question.context": torch.tensor([2.0, 4.0]),
        "fusion.mlp.0.weight": torch.tensor([0.0, 1.0, 0.0, 0.0]),
    }
    assert penalty(own).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="compares prompt tensors, and the aggregated state"):
        ReliabilityWeighted(prompt_tensors={"question.context"}).initialize({"fusion.w": torch.zeros(2)})


def test_a_shared_head_is_pulled_by_its_own_cosine_term_with_head_alpha(caplog):
    shared = {"question.context": torch.tensor([1.0, 0.0]), "fusion.w": torch.tensor([0.0, 2.0, 0.0])}
    own = {"question.context": torch.tensor([0.0, 4.0]), "fusion.w": torch.tensor([1.0, 1.0, 0.0])}
    prompts = {"question.context"}
    both = ReliabilityRule(alpha=2.0, prompt_tensors=prompts, head_alpha=0.5)
    penalty = both.penalty(RoundInputs(shared, {}, FitInstructions(0, 0)))
    # 2 · (1 − cos 90°) on the prompt + 0.5 · (1 − 1/√2) on the head, each flattened on its own
    assert penalty(own).item() == pytest.approx(2.0 + 0.5 * (1 - 2**-0.5))
    prompt_only = ReliabilityRule(alpha=2.0, prompt_tensors=prompts)
    assert prompt_only.penalty(RoundInputs(shared, {}, FitInstructions(0, 0)))(own).item() == pytest.approx(
        2.0
    )
    head_only = ReliabilityRule(alpha=0.0, prompt_tensors=prompts, head_alpha=0.5)
    assert head_only.penalty(RoundInputs(shared, {}, FitInstructions(0, 0)))(own).item() == pytest.approx(
        0.5 * (1 - 2**-0.5)
    )
    assert (
        ReliabilityRule(alpha=0.0, prompt_tensors=prompts).penalty(
            RoundInputs(shared, {}, FitInstructions(0, 0))
        )
        is None
    )
    # a head pull where only prompts travel (the head kept local) is refused before the first round
    with pytest.raises(ValueError, match="head_alpha pulls the tensors that travel beside the prompts"):
        ReliabilityWeighted(prompt_tensors=prompts, pulls_head=True).initialize(
            {"question.context": torch.zeros(2)}
        )
    ReliabilityWeighted(prompt_tensors=prompts, pulls_head=True).initialize(shared)
    # a head that travels and that no client reads is named in a warning
    with caplog.at_level(logging.WARNING, logger="fedprompt.strategies.reliability"):
        ReliabilityWeighted(prompt_tensors=prompts).initialize(shared)
    assert "fusion.w travel beside the prompts but strategy.head_alpha is 0" in caplog.text


def test_reliability_rule_pulls_the_own_prompt_toward_the_shared_one():
    rule = ReliabilityRule(alpha=2.0)
    shared = {"p": torch.tensor([1.0, 0.0])}
    penalty = rule.penalty(RoundInputs(shared, {}, FitInstructions(0, 0)))
    assert penalty({"p": torch.tensor([0.0, 3.0])}).item() == pytest.approx(2.0)  # 2·(1 − cos 90°)
    assert penalty({"p": torch.tensor([5.0, 0.0])}).item() == pytest.approx(0.0, abs=1e-6)
    own = {"personal/p": torch.tensor([0.5, 0.5])}
    assert torch.equal(
        rule.start(RoundInputs(shared, own, FitInstructions(0, 0)))["p"], torch.tensor([0.5, 0.5])
    )
    assert torch.equal(
        flatten({"b": torch.ones(1), "a": torch.zeros(2)}), torch.tensor([0.0, 0.0, 1.0]).double()
    )


def test_a_reliability_run_keeps_personal_prompts_and_reports_weights(keyword_file, tmp_path):
    config = tiny_run_config(
        keyword_file,
        partition={"kind": "iid", "num_clients": 4, "local_val_fraction": 0.3},
        federation={"rounds": 3},
        strategy={"kind": "reliability", "alpha": 0.5},
    )
    result = fedprompt.run(config, output_dir=tmp_path)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = rows[-1]["reliability_weights"]
    assert sorted(weights) == ["0", "1", "2", "3"] and sum(weights.values()) == pytest.approx(1.0)
    assert rows[-1]["personal_accuracy_mean"] >= 0.6  # chance is 1/3
    fits = [r for r in result.client_history if r["event"] == "fit"]
    assert all(0 <= r["val_accuracy"] <= 1 for r in fits)
    checkpoint = load_file(result.run_dir / "checkpoint.safetensors")
    assert sorted(k for k in checkpoint if k.startswith("client/")) == [
        f"client/{c}/personal/prompt.embeddings" for c in range(4)
    ]
