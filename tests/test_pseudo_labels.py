"""FeS: few-shot clients (data.labelled_per_class), the curriculum's pacing, the confidence filter
and per-class quotas on hand-made cases, vote-k's diverse choice, and pseudo-labels that never
leave the client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedprompt
from fedprompt.config import ConfigError, PseudoLabelConfig, load_config
from fedprompt.data.partition import few_labels
from fedprompt.federation.instructions import FitInstructions
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.pseudo_labels import (
    UNLABELLED,
    diverse_subset,
    labelled_counts,
    pacing_count,
    select_pseudo_labels,
)

from conftest import tiny_run_config, write_keyword_dataset


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def test_pacing_grows_linearly_with_the_round():
    assert [pacing_count(r, 50, 0.1, "curriculum") for r in (1, 2, 3, 9, 10, 11)] == [5, 10, 15, 45, 50, 50]
    assert [pacing_count(r, 50, 0.1, "fixed") for r in (1, 2, 7)] == [5, 5, 5]
    assert pacing_count(3, 7, 0.1, "curriculum") == 2  # ⌊0.1·3·7⌋
    assert pacing_count(1, 0, 0.5, "curriculum") == 0


def test_confidence_filter_and_class_quotas_by_hand():
    """Ten candidates, two classes with labelled counts 3 and 1: round 2 at pace 0.2 admits
    n = ⌊0.2·2·10⌋ = 4, so class 0 may take ⌊4·3/4⌋ = 3 and class 1 ⌊4·1/4⌋ = 1, from the predictions
    at or above the threshold 0.7 only."""
    p0 = [0.95, 0.9, 0.65, 0.8, 0.25, 0.2, 0.1, 0.55, 0.72, 0.5]
    probs = torch.tensor([[p, 1 - p] for p in p0])
    config = PseudoLabelConfig(threshold=0.7, pace=0.2)
    chosen = select_pseudo_labels(probs, 2, [3, 1], config, np.random.default_rng(0))
    # class 0 above 0.7: examples 0, 1, 3, 8 (4 of them) -> 3 drawn; class 1 above 0.7: 4, 5, 6
    zeros = [i for i in chosen.indices.tolist() if chosen.labels[chosen.indices.tolist().index(i)] == 0]
    ones = [i for i in chosen.indices.tolist() if i not in zeros]
    assert len(zeros) == 3 and set(zeros) <= {0, 1, 3, 8}
    assert len(ones) == 1 and set(ones) <= {4, 5, 6}
    assert chosen.indices.tolist() == sorted(chosen.indices.tolist())
    assert all(c >= 0.7 for c in chosen.confidence)
    # round 1: n = 2, quotas ⌊2·3/4⌋ = 1 and ⌊2·1/4⌋ = 0
    first = select_pseudo_labels(probs, 1, [3, 1], config, np.random.default_rng(0))
    assert len(first.indices) == 1 and first.labels.tolist() == [0]
    # a threshold nothing passes admits nothing, whatever the pace
    strict = select_pseudo_labels(
        probs, 9, [3, 1], PseudoLabelConfig(threshold=0.99, pace=1.0), np.random.default_rng(0)
    )
    assert len(strict.indices) == 0
    # enough quota: every confident candidate is taken, without a draw
    everything = select_pseudo_labels(
        probs, 5, [1, 1], PseudoLabelConfig(threshold=0.7, pace=1.0), np.random.default_rng(1)
    )
    assert everything.indices.tolist() == [0, 1, 3, 4, 5, 6, 8]
    assert everything.labels.tolist() == [0, 0, 0, 1, 1, 1, 0]


def test_the_draw_follows_confidence():
    """Among many candidates of one class, the quota is drawn in proportion to confidence: the
    confident half is drawn far more often than the hesitant half."""
    conf = torch.tensor([0.99] * 50 + [0.51] * 50)
    probs = torch.stack([conf, 1 - conf], 1)
    config = PseudoLabelConfig(pace=0.1)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([select_pseudo_labels(probs, 1, [1, 0], config, rng).indices for _ in range(200)])
    assert (drawn < 50).mean() > 0.6


def test_vote_k_picks_one_of_each_cluster_first():
    """Three tight clusters of three: every example votes for its two neighbours in its cluster, so
    once a cluster has a pick its voters count 1/10 and the next pick comes from another cluster."""
    rng = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    features = torch.cat([centres[i] + 0.01 * torch.randn(3, 3, generator=rng) for i in range(3)])
    picked = diverse_subset(features, 3, neighbours=2)
    assert sorted(i // 3 for i in picked.tolist()) == [0, 1, 2]
    # by hand for the first pick: every example has 2 voters (score 2), the tie goes to example 0;
    # then examples 1 and 2 have one covered voter (1 + 0.1), the other clusters still 2
    assert picked.tolist()[0] == 0
    assert diverse_subset(features, 0, 2).tolist() == []
    assert diverse_subset(features, 9, 2).tolist() == list(range(9))


def test_few_labels_keeps_the_count_per_class():
    labels = np.array([0, 1, 0, 0, 2, 1, 0, 2, 2, 2])
    kept = few_labels(labels, 2, seed=3)
    assert np.bincount(labels[kept]).tolist() == [2, 2, 2]
    assert few_labels(labels, 2, seed=3).tolist() == kept.tolist()
    assert few_labels(labels, 9, seed=0).all()
    assert labelled_counts(torch.tensor([0, UNLABELLED, 2, 2]), 3) == [1, 0, 2]


def test_few_shot_clients_and_their_checks(keyword_file):
    raw = tiny_run_config(keyword_file, data={"labelled_per_class": 3})
    experiment = build_experiment(load_config(raw))
    for client in experiment.clients.values():
        assert torch.bincount(client.train_data.labels).max() <= 3
        assert len(client.unlabelled_data) > 0
        assert bool((client.unlabelled_data.labels == UNLABELLED).all())  # the labels are not on the client
    assert experiment.example_counts() == {c: len(cl.train_data) for c, cl in experiment.clients.items()}
    with pytest.raises(ConfigError, match=r"set data\.labelled_per_class"):
        load_config({**tiny_run_config(keyword_file), "pseudo_labels": {}})
    with pytest.raises(ConfigError, match="by gradient on a local text backbone"):
        load_config({**raw, "pseudo_labels": {}, "optimizer": {"kind": "spsa"}})


def test_pseudo_labels_never_leave_the_client(keyword_file):
    """A FeS client's update carries the prompt and scalar counts only: the same tensors and the
    same metric names as a labelled-only client's, plus the number of pseudo-labels and their mean
    confidence; its carried state holds no labels either."""
    raw = tiny_run_config(keyword_file, data={"labelled_per_class": 3})
    plain = build_experiment(load_config(raw))
    fes = build_experiment(load_config({**raw, "pseudo_labels": {"pace": 0.5}}))
    instructions = FitInstructions(round=2, seed=11)
    state = plain.initial_state()
    a = plain.clients[0].fit(state, instructions)
    b = fes.clients[0].fit(state, instructions)
    assert set(b.update.state) == set(a.update.state) and b.update.extras == a.update.extras == {}
    assert set(b.update.metrics) - set(a.update.metrics) == {"pseudo_labels", "pseudo_label_confidence"}
    assert b.update.metrics["pseudo_labels"] > 0
    assert b.carried == a.carried == {}
    assert b.update.num_examples == a.update.num_examples == len(fes.clients[0].train_data)


@pytest.mark.slow
def test_fes_run_admits_more_pseudo_labels_each_round(keyword_file):
    raw = tiny_run_config(keyword_file, data={"labelled_per_class": 3}, federation={"rounds": 3})
    result = fedprompt.run({**raw, "pseudo_labels": {"pace": 0.1, "diverse_fraction": 0.5}}, write=False)
    fits = [r for r in result.client_history if r["event"] == "fit" and r["client_id"] == 0]
    counts = [r["pseudo_labels"] for r in fits]
    assert len(counts) == 3 and counts[0] < counts[1] < counts[2], counts
