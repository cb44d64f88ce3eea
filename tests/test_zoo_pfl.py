"""ZooPFL: a black-box text model adapted by input surgery (SPSA), semantic re-mapping and a personal
head (gradient); only the surgery and the re-mapping travel, every black-box query is counted."""

from __future__ import annotations

import pytest
import torch

import fedprompt
from fedprompt.config import ConfigError, load_config
from prompt_modules.zoo_pfl import InputSurgery, ZooPFLClassifier

from conftest import TINY_BERT, tiny_backbone, tiny_run_config, write_keyword_dataset

ZOO = {"kind": "zoo-pfl", "rank": 4, "zo_lr": 0.01, "zo_epsilon": 0.01, "zo_budget": 320}
SIMILARITY = {"kind": "similarity", "template": "{text}"}


@pytest.fixture(scope="module")
def keywords(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def test_input_surgery_by_hand():
    surgery = InputSurgery(hidden=2, rank=1, generator=torch.Generator().manual_seed(0))
    e = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]])
    assert torch.equal(surgery.apply(e), e)  # D starts at 0: the identity
    weights = torch.tensor([0.5, 1.0, 2.0, -1.0])  # E = [[0.5, 1]], D = [[2], [-1]]
    t = torch.tanh(e @ torch.tensor([[0.5], [1.0]]))
    assert torch.allclose(surgery.apply(e, weights), e + t @ torch.tensor([[2.0, -1.0]]), rtol=1e-6)


def test_the_black_box_gives_no_gradient_and_counts_its_queries():
    backbone = tiny_backbone({**TINY_BERT, "initializer_range": 0.3}, head="none")
    model = ZooPFLClassifier(backbone, num_classes=3, rank=2)
    batch = model.encode_texts(["apple river", "car", "a plane"])
    loss = model(batch).sum()
    loss.backward()
    assert model.surgery.weights.grad is None  # nothing flows back through the black box
    assert model.remap.weight.grad is not None and model.head.weight.grad is not None
    assert model.black_box.queries == 3
    losses = model.population_losses(
        torch.stack([model.surgery.weights.detach()] * 2), {**batch, "labels": torch.tensor([0, 2, 2])}
    )
    assert losses.shape == (2,) and losses[0] == losses[1] and model.black_box.queries == 9


def test_zoo_pfl_learns_with_every_query_counted(keywords):
    """Three rounds on the keyword task: each client's personal accuracy (its own head on the shared
    surgery and re-mapping) rises well above where it started; only the shared parts are
    aggregated; each fit's queries are its examples once (the features of the gradient phase) plus
    2 × 16 per SPSA step of the surgery."""
    raw = tiny_run_config(keywords, federation={"rounds": 3}, optimizer={"lr": 0.05}, head=SIMILARITY)
    result = fedprompt.run({**raw, "prompt": ZOO}, write=False)
    personal = result.metric("personal_accuracy_mean")
    assert personal[-1] > personal[0] + 0.3, personal
    assert set(result.final_state) == {"surgery.weights", "remap.weight", "remap.bias"}
    fits = [row for row in result.client_history if row.get("event") == "fit"]
    steps = 320 // (2 * 16)
    assert fits and all(row["queries"] == row["num_examples"] + steps * 2 * 16 for row in fits)
    assert all(row["surgery_steps"] == steps for row in fits)


def test_zoo_pfl_configurations(keywords):
    raw = {**tiny_run_config(keywords, head=SIMILARITY), "prompt": ZOO}
    assert load_config(raw).personalization.local == ["head.*"]
    with pytest.raises(ConfigError, match="train by gradient"):
        load_config({**raw, "optimizer": {"kind": "spsa"}})
    with pytest.raises(ConfigError, match="server-side rule"):
        load_config({**raw, "strategy": {"kind": "fedprox"}})
