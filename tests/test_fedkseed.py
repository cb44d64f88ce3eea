"""FedKSeed: clients send (seed index, projected gradient) pairs, every party replays them.

The replay is checked bit for bit (one client: the server's prompt is the client's own; several:
the sequential replay computed here), the pairs are validated, the bytes counted, the seed-pool
downlink rebuilds the server's prompt on the client, and a federated run learns.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.execution.simulation import _fit_client, make_server
from fedprompt.federation.client_rules import RoundInputs
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import encode_update
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fedkseed import (
    AMPLITUDE_COUNT,
    AMPLITUDE_SUM,
    FINGERPRINT,
    PROJECTED_GRAD,
    SEED_INDEX,
    SEED_POOL,
    SEED_PROBABILITIES,
    FedKSeed,
    KSeedRule,
    KSeedSetup,
    check_pairs,
    kseed_setup,
)
from fedprompt.federation.strategies.registry import build_strategy
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.blackbox import KSeedTrainer
from fedprompt.training.gradient import LocalRound
from optimizers.seed_pool import SeedPool, importance_probabilities
from prompt_modules.soft_prompt import PrefixPrompt, SoftPrompt
from prompt_modules.text_classifier import TextPromptClassifier, VerbalizerHead

from conftest import TINY_BERT, tiny_backbone, tiny_run_config, write_keyword_dataset

TEXTS = ["apple river", "car", "banana train plane", "forest", "cherry", "mountain of car", "the apple"]
SETUP = KSeedSetup(pool_seed=7, num_seeds=4096, steps=6, lr=0.05, epsilon=1e-2, max_projected_grad=1000.0)
SPSA = {"kind": "spsa", "lr": 0.1, "epsilon": 0.01, "budget": 2 * 16 * 100, "batch_size": 16}


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def _classifier(kind: str) -> TextPromptClassifier:
    from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier, ProjectionSpec

    backbone = tiny_backbone({**TINY_BERT, "initializer_range": 0.3})
    head = VerbalizerHead.from_label_words(backbone, [["bad"], ["good"]])
    template = "{text} It was [MASK]."
    g = torch.Generator().manual_seed(0)
    if kind == "intrinsic":
        prompt = IntrinsicPrompt.from_backbone(
            backbone, ProjectionSpec(seed=1, dim=6, num_tokens=2, scale=1.0)
        )
        return IntrinsicTextClassifier(backbone, prompt, head, template, 2).eval()
    prompt = (
        SoftPrompt(torch.randn(4, 32, generator=g))
        if kind == "soft"
        else PrefixPrompt(torch.randn(2, 2, 2, 3, 16, generator=g), 0)
    )
    return TextPromptClassifier(backbone, prompt, head, template).eval()


def _data(clf: TextPromptClassifier):
    from fedprompt.training.batching import TensorData

    return TensorData({**clf.encode_texts(TEXTS), "labels": torch.tensor([0, 1, 0, 1, 0, 1, 0])})


def _train(clf, start: dict, seed: int, setup: KSeedSetup = SETUP):
    """One client's round from ``start``: (its update, its local prompt afterwards)."""
    clf.load_state_dict(start)
    data = _data(clf)
    stats = KSeedTrainer(setup, 4, "cpu").train(clf, data, LocalRound(FitInstructions(1, seed)))
    return Update(seed, {}, len(data) + seed, {}, stats.tensors), clf.prompt_state()


# ----------------------------------------------------------------------------- the replay


@pytest.mark.parametrize("kind", ["soft", "prefix", "intrinsic"])
def test_one_client_the_servers_replay_is_the_clients_prompt_bit_for_bit(kind):
    clf = _classifier(kind)
    start = clf.prompt_state()
    update, local = _train(clf, start, seed=3)
    assert update.extras[SEED_INDEX].shape == (SETUP.steps,) and update.extras[PROJECTED_GRAD].abs().sum() > 0
    assert not all(torch.equal(local[n], start[n]) for n in start)  # the client moved
    aggregated = FedKSeed(SETUP).aggregate(start, [update])
    assert set(aggregated) == set(local)
    assert all(torch.equal(aggregated[n], local[n]) for n in local)


def test_several_clients_replay_in_client_then_step_order_with_example_weights():
    """θ ← θ − η·(w_c·ĝ)·u(seed) for client 0's steps, then client 1's, then client 2's, in float64
    from the round's global prompt, rounded once: computed here step by step."""
    clf = _classifier("soft")
    start = clf.prompt_state()
    updates, locals_ = zip(*(_train(clf, start, seed=s) for s in (2, 0, 1)), strict=True)
    aggregated = FedKSeed(SETUP).aggregate(start, list(updates))

    pool = SeedPool(SETUP.pool_seed, SETUP.num_seeds)
    (name,) = start
    theta = start[name].double()
    total = sum(u.num_examples for u in updates)
    for update in sorted(updates, key=lambda u: u.client_id):
        weight = update.num_examples / total
        pairs = zip(update.extras[SEED_INDEX].tolist(), update.extras[PROJECTED_GRAD].tolist(), strict=True)
        for index, grad in pairs:
            (u,) = pool.directions(int(index), [theta])
            theta = theta - u * (SETUP.lr * (weight * grad))
    assert torch.equal(aggregated[name], theta.float())
    # it is FedAvg of the clients' local prompts, up to rounding
    mean = sum(u.num_examples * loc[name].double() for u, loc in zip(updates, locals_, strict=True)) / total
    torch.testing.assert_close(aggregated[name].double(), mean, rtol=0, atol=1e-6)
    assert not torch.equal(aggregated[name], locals_[0][name])
    equal = FedKSeed(replace(SETUP, weighting="equal")).aggregate(start, list(updates))
    plain = sum(loc[name].double() for loc in locals_) / 3
    torch.testing.assert_close(equal[name].double(), plain, rtol=0, atol=1e-6)


def test_a_step_above_the_bound_is_skipped_and_sent_as_zero():
    clf = _classifier("soft")
    start = clf.prompt_state()
    tight = replace(SETUP, max_projected_grad=1e-9)
    update, local = _train(clf, start, seed=3, setup=tight)
    assert update.extras[PROJECTED_GRAD].tolist() == [0.0] * SETUP.steps
    assert torch.equal(local["prompt.embeddings"], start["prompt.embeddings"])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("index", "grad", "message"),
    [
        (4096.0, 0.5, r"step 1: seed index 4096.0 is not an integer in \[0, 4096\)"),
        (-1.0, 0.5, r"seed index -1.0 is not an integer"),
        (2.5, 0.5, r"seed index 2.5 is not an integer"),
        (3.0, float("nan"), r"step 1: projected gradient nan is not finite"),
        (3.0, float("inf"), r"projected gradient inf is not finite"),
        (3.0, -2000.0, r"\|projected gradient\| 2000 exceeds max_projected_grad 1000"),
    ],
)
def test_bad_pairs_are_refused_naming_the_step(index, grad, message):
    extras = {SEED_INDEX: torch.tensor([0.0, index, 1.0]), PROJECTED_GRAD: torch.tensor([0.1, grad, 0.2])}
    with pytest.raises(ValueError, match=message):
        check_pairs(extras, SETUP)
    good = {SEED_INDEX: torch.tensor([0.0, 4095.0]), PROJECTED_GRAD: torch.tensor([-1000.0, 3.0])}
    assert check_pairs(good, SETUP) == ([0, 4095], [-1000.0, 3.0])


def test_config_takes_fedkseed_with_spsa_only(keywords):
    def config(**changes) -> dict:
        raw = {**tiny_run_config(keywords), "optimizer": SPSA, "strategy": {"kind": "fedkseed"}}
        return {**raw, **changes}

    loaded = load_config(config())
    setup = kseed_setup(loaded)
    assert (setup.num_seeds, setup.steps, setup.lr, setup.epsilon) == (4096, 100, 0.1, 0.01)
    assert setup == kseed_setup(load_config(config()))  # the pool is the run seed's
    assert setup.pool_seed != kseed_setup(load_config(config(seed=1))).pool_seed
    deep = config(prompt={"kind": "deep", "mode": "prefix"})
    assert load_config(deep).strategy.kind == "fedkseed"
    with pytest.raises(ConfigError, match=r"fedkseed replays SPSA steps; set optimizer.kind: spsa"):
        load_config(config(optimizer={"kind": "gradient"}))
    cmaes = {"kind": "cmaes", "budget": 640}
    with pytest.raises(ConfigError, match=r"fedkseed replays SPSA steps"):
        load_config(config(optimizer=cmaes, prompt={"kind": "intrinsic"}))
    with pytest.raises(ConfigError, match=r"set payload.wire_dtype: float32"):
        load_config(config(payload={"wire_dtype": "float16"}))
    with pytest.raises(ConfigError, match=r"set optimizer.score_on: batch"):
        load_config(config(optimizer={**SPSA, "score_on": "local-set"}))
    with pytest.raises(ConfigError, match=r"remove robustness.max_update_norm"):
        load_config(config(robustness={"max_update_norm": 1.0}))
    with pytest.raises(ValueError, match="FedKSeed needs its setup"):
        build_strategy(loaded.strategy)


# ----------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def experiment(keywords):
    raw = tiny_run_config(
        keywords,
        partition={"kind": "iid", "num_clients": 3, "local_val_fraction": 0.2},
        federation={"rounds": 3, "min_clients": 2},
    )
    config = load_config(
        {**raw, "optimizer": {**SPSA, "budget": 2 * 16 * 40}, "strategy": {"kind": "fedkseed"}}
    )
    return build_experiment(config), config


def test_clients_send_pairs_of_8_bytes_a_step_and_bad_ones_are_rejected(experiment):
    exp, config = experiment
    server = make_server(exp, config)
    start = dict(server.global_state)
    record = server.begin_round(1)
    for cid in (0, 1):
        _fit_client(exp, server, record, cid)
    steps = kseed_setup(config).steps
    prompt_bytes = 4 * sum(t.numel() for t in start.values())
    for cid in (0, 1):
        up = server.bytes.per_client(1)[cid]["up"]
        assert 8 * steps < up < 8 * steps + 700 < prompt_bytes  # the pairs and a header, never the prompt
    good = record.accepted[0]
    bad_index = {**good.extras, SEED_INDEX: torch.full((steps,), 4096.0)}
    server.receive(record, 2, encode_update(Update(2, {}, 10, {}, bad_index), "float32"))
    assert record.rejected[2].startswith("invalid update: step 0: seed index 4096.0 is not an integer")
    nan = {**good.extras, PROJECTED_GRAD: torch.full((steps,), float("nan"))}
    server.receive(record, 2, encode_update(Update(2, {}, 10, {}, nan), "float32"))
    assert "non-finite" in record.rejected[2]
    with_prompt = Update(2, start, 10, {}, good.extras)
    server.receive(record, 2, encode_update(with_prompt, "float32"))
    assert "unexpected ['prompt.embeddings']" in record.rejected[2]
    assert [u.client_id for u in record.accepted] == [0, 1]
    server.aggregate(record)
    hand = FedKSeed(kseed_setup(config)).aggregate(start, record.accepted)
    assert torch.equal(server.global_state["prompt.embeddings"], hand["prompt.embeddings"])


def test_seed_pool_downlink_rebuilds_the_servers_prompt_on_every_client(experiment):
    """Downlink seed-pool: the server sends the K accumulated ĝ (4·K bytes and a header, whatever the
    prompt) and each client's start, rebuilt from θ_0, is the server's global prompt bit for bit;
    the strategy resumes from its state exactly."""
    exp, config = experiment
    setup = replace(kseed_setup(config), downlink="seed-pool")
    initial = exp.initial_state()
    exp.strategy = FedKSeed(setup)
    rule = KSeedRule(setup, initial)
    saved_rules = {cid: client.rule for cid, client in exp.clients.items()}
    try:
        for client in exp.clients.values():
            client.rule = rule
        server = make_server(exp, config)
        assert server.downlink_spec.shapes == {"extra/seed_pool": (setup.num_seeds,)}
        for round_num in (1, 2):
            record = server.begin_round(round_num)
            for cid in (0, 2):
                _fit_client(exp, server, record, cid)
            assert sorted(u.client_id for u in record.accepted) == [0, 2], record.rejected
            assert (
                4 * setup.num_seeds
                < server.bytes.per_client(round_num)[0]["down"]
                < 4 * setup.num_seeds + 300
            )
            server.aggregate(record)
        pool = server.strategy.downlink_extras()[SEED_POOL]
        assert 0 < int(torch.count_nonzero(pool)) <= 2 * 2 * setup.steps
        instructions = FitInstructions(3, 0, server.strategy.client_config(), extras={SEED_POOL: pool})
        start = rule.start(RoundInputs({}, {}, instructions))
        assert torch.equal(start["prompt.embeddings"], server.global_state["prompt.embeddings"])
        assert not torch.equal(start["prompt.embeddings"], initial["prompt.embeddings"])
        resumed = FedKSeed(setup)
        resumed.load_state_dict(server.strategy.state_dict())
        assert torch.equal(resumed.downlink_extras()[SEED_POOL], pool)
        again = server.strategy.aggregate(server.global_state, record.accepted)
        assert torch.equal(
            resumed.aggregate(server.global_state, record.accepted)["prompt.embeddings"],
            again["prompt.embeddings"],
        )
    finally:
        exp.strategy = FedKSeed(kseed_setup(config))
        for cid, client in exp.clients.items():
            client.rule = saved_rules[cid]


def test_fedkseed_run_learns_with_kilobytes_up(keywords):
    """Two clients, two rounds of 150 SPSA steps along the pool on a one-token prompt: the global
    prompt's test loss falls by a quarter and its accuracy rises above its start and chance (1/3),
    while each client sends 8 bytes a step and a header."""
    raw = tiny_run_config(
        keywords,
        prompt={"num_tokens": 1},
        partition={"kind": "iid", "num_clients": 2, "local_val_fraction": 0.0},
        federation={"rounds": 2, "min_clients": 2},
    )
    spsa = {**SPSA, "lr": 0.3, "budget": 2 * 16 * 150}
    result = fedprompt.run({**raw, "optimizer": spsa, "strategy": {"kind": "fedkseed"}}, write=False)
    accuracy, loss = result.metric("global_accuracy"), result.metric("global_loss")
    assert loss[-1] < 0.75 * loss[0], loss
    assert accuracy[-1] > 0.4 and accuracy[-1] > accuracy[0] + 0.1, accuracy
    rows = [row for row in result.client_history if row.get("event") == "fit"]
    assert len(rows) == 4 and all(row["accepted"] and row["bytes_up"] < 8 * 150 + 700 for row in rows)
    assert all(row["queries"] == 2 * 16 * 150 for row in rows)


# ----------------------------------------------------------------------------- the directions' stream


def test_directions_are_a_specified_numpy_stream_not_pytorchs():
    """u_k is NumPy's PCG64 stream of float64 standard normals seeded by SeedSequence([pool seed, k]),
    cut into the tensors' shapes: what any party computes without PyTorch's random streams."""
    import numpy as np

    pool = SeedPool(seed=123, size=64)
    like = [torch.zeros(2, 3), torch.zeros(4)]
    torch.manual_seed(999)  # PyTorch's global stream plays no part
    u = pool.directions(17, like)
    expected = np.random.Generator(np.random.PCG64(np.random.SeedSequence([123, 17]))).standard_normal(10)
    assert [tuple(d.shape) for d in u] == [(2, 3), (4,)] and all(d.dtype == torch.float64 for d in u)
    assert torch.equal(torch.cat([d.reshape(-1) for d in u]), torch.from_numpy(expected))
    assert pool.fingerprint(like) == SeedPool(seed=123, size=64).fingerprint(like) < 2**52
    assert pool.fingerprint(like) != SeedPool(seed=124, size=64).fingerprint(like)
    assert pool.fingerprint(like) != pool.fingerprint([torch.zeros(3, 2), torch.zeros(4)])


def test_a_client_whose_directions_differ_refuses_to_step(experiment):
    """The server tells clients the fingerprint of the pool's first directions over the prompt; a
    client that would step along other directions (another release's stream, another pool) fails
    its fit with the reason, the server rejects it and the round goes on with the others."""
    exp, config = experiment
    setup = kseed_setup(config)
    server = make_server(exp, config)
    sent = server.strategy.client_config()[FINGERPRINT]
    assert sent == float(setup.fingerprint(exp.initial_state()))
    other = replace(setup, pool_seed=setup.pool_seed + 1)  # what another NumPy stream would give
    with pytest.raises(ValueError, match="directions differ from the server's"):
        KSeedRule(other).start(
            RoundInputs(exp.initial_state(), {}, FitInstructions(1, 0, {FINGERPRINT: sent}))
        )
    with pytest.raises(ValueError, match="sent no 'kseed_fingerprint'"):
        KSeedRule(setup).start(RoundInputs(exp.initial_state(), {}, FitInstructions(1, 0)))
    saved = exp.clients[1].rule
    try:
        exp.clients[1].rule = KSeedRule(other)
        record = server.begin_round(1)
        for cid in (0, 1):
            _fit_client(exp, server, record, cid)
        assert [u.client_id for u in record.accepted] == [0]
        assert "directions differ" in record.rejected[1]
    finally:
        exp.clients[1].rule = saved


def test_the_fingerprint_crosses_flower_records_exactly():
    from flwr.app import RecordDict

    from fedprompt.flower.records import INSTRUCTIONS_RECORD, instructions_record, read_instructions

    fingerprint = float(2**52 - 3)
    record = instructions_record(4, FitInstructions(2, 9, {FINGERPRINT: fingerprint}))
    _, instructions = read_instructions(RecordDict({INSTRUCTIONS_RECORD: record}))
    assert instructions.client_config[FINGERPRINT] == fingerprint


# ----------------------------------------------------------------------------- FedKSeed-Pro


def test_importance_probabilities_by_hand():
    """p = softmax of the min-max-normalised mean |ĝ| per seed, each history starting at one 0."""
    sums = torch.tensor([0.0, 4.0, 1.0], dtype=torch.float64)  # seed 1: |ĝ| 4 and 4; seed 2: |ĝ| 1
    counts = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    p = importance_probabilities(sums, counts)
    means = torch.tensor([0.0, 4 / 3, 0.5], dtype=torch.float64)
    expected = torch.softmax(means / (4 / 3 + 1e-10), 0)
    assert torch.allclose(p, expected, rtol=1e-15, atol=0)
    uniform = importance_probabilities(torch.zeros(3), torch.ones(3))
    assert torch.allclose(uniform, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=1e-15, atol=0)


def test_fedkseed_pro_server_tracks_amplitudes_sends_probabilities_and_resumes():
    setup = replace(SETUP, num_seeds=4, steps=2, seed_sampling="importance")
    server = FedKSeed(setup)
    state = {"p": torch.zeros(3)}
    server.initialize(state)
    assert torch.equal(server.downlink_extras()[SEED_PROBABILITIES], torch.full((4,), 0.25))
    pairs = {SEED_INDEX: torch.tensor([1.0, 1.0]), PROJECTED_GRAD: torch.tensor([-4.0, 4.0])}
    other = {SEED_INDEX: torch.tensor([2.0, 3.0]), PROJECTED_GRAD: torch.tensor([1.0, 0.0])}
    server.aggregate(state, [Update(0, {}, 1, {}, pairs), Update(1, {}, 1, {}, other)])
    saved = server.state_dict()
    assert torch.equal(saved[AMPLITUDE_SUM], torch.tensor([0.0, 8.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(saved[AMPLITUDE_COUNT], torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64))
    sent = server.downlink_extras()[SEED_PROBABILITIES]
    means = torch.tensor([0.0, 8 / 3, 0.5, 0.0], dtype=torch.float64)
    assert torch.equal(sent, torch.softmax(means / (8 / 3 + 1e-10), 0).to(torch.float32))
    resumed = FedKSeed(setup)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.downlink_extras()[SEED_PROBABILITIES], sent)
    with pytest.raises(ValueError, match="keeps no state like"):
        FedKSeed(SETUP).load_state_dict(saved)


def test_fedkseed_pro_clients_draw_seeds_by_the_probabilities_sent():
    clf = _classifier("soft")
    start = clf.prompt_state()
    setup = replace(SETUP, num_seeds=8, steps=6, seed_sampling="importance")
    only_five = torch.zeros(8)
    only_five[5] = 1.0
    clf.load_state_dict(start)
    instructions = FitInstructions(1, 3, extras={SEED_PROBABILITIES: only_five})
    stats = KSeedTrainer(setup, 4, "cpu").train(clf, _data(clf), LocalRound(instructions))
    assert stats.tensors[SEED_INDEX].tolist() == [5.0] * 6
    with pytest.raises(ValueError, match="sent no 'seed_probabilities'"):
        KSeedTrainer(setup, 4, "cpu").train(clf, _data(clf), LocalRound(FitInstructions(1, 3)))
    assert (
        load_config(
            {
                "optimizer": SPSA,
                "prompt": {"kind": "soft"},
                "strategy": {"kind": "fedkseed", "seed_sampling": "importance"},
            }
        ).strategy.seed_sampling
        == "importance"
    )
