"""FedPepTAO: layer scores and selection against hand computations, deep prompts on a chosen set of
layers (only those trained and sent), the server's adaptive update by hand, and clients' AdamW
moments carried across rounds and resumed bit for bit. Also the deep-prompt review points: a
split prompt splits P-tuning v2's prefixes, and their dropout."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import fedprompt
from fedprompt.config import ConfigError, FedPepTAOConfig, RunConfig, load_config
from fedprompt.federation.personalization import prompt_split
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fednova import LocalStepBound
from fedprompt.federation.strategies.fedpeptao import FedPepTAO
from fedprompt.federation.strategies.registry import build_strategy
from fedprompt.tasks.text.parts import build_prompt
from optimizers.gradient import GradientOptimizer, GradientSettings
from prompt_modules.layer_scores import EPSILON, consensus_scores, layer_score, top_layers
from prompt_modules.soft_prompt import PrefixPrompt
from prompt_modules.text_classifier import TextPromptClassifier, VerbalizerHead

from conftest import TINY_BERT, tiny_backbone, tiny_run_config, write_keyword_dataset

THREE_LAYERS = {**TINY_BERT, "num_hidden_layers": 3, "initializer_range": 0.3}


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- layer scores


def test_layer_score_of_two_examples_by_hand():
    """Two examples whose outputs have cosine s: K = [[1, s], [s, 1]], eigenvalues 1 ± s, and the
    score is Σ log(λ + ε) + 1/(λ + ε); padding positions do not count."""
    a = torch.tensor([[1.0, 0.0], [3.0, 3.0]])  # position 1 of example 0 is padding
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    hidden = torch.stack([a, b])
    mask = torch.tensor([[1, 0], [1, 1]])
    s = 1 / math.sqrt(2)  # cos([1, 0, 0, 0], [1, 1, 0, 0])
    expected = sum(math.log(lam + EPSILON) + 1 / (lam + EPSILON) for lam in (1 + s, 1 - s))
    assert layer_score(hidden, mask) == pytest.approx(expected, rel=1e-12)
    same = torch.stack([a, a])
    assert layer_score(same, torch.ones(2, 2)) == pytest.approx(
        math.log(2 + EPSILON) + 1 / (2 + EPSILON) + math.log(EPSILON) + 1 / EPSILON, rel=1e-9
    )
    with pytest.raises(ValueError, match="at least 2"):
        layer_score(hidden[:1], mask[:1])


def test_consensus_and_top_layers_by_hand():
    scores = consensus_scores([[1.0, 5.0, 2.0, 4.0], [3.0, 1.0, 2.0, 4.0]], [1, 3])
    assert torch.equal(scores, torch.tensor([2.5, 2.0, 2.0, 4.0], dtype=torch.float64))
    assert top_layers(scores, [2, 3, 4, 5], 2) == [2, 5]  # not contiguous, ascending
    assert top_layers(scores, [2, 3, 4, 5], 3) == [2, 3, 5]  # a tie goes to the lower layer
    with pytest.raises(ValueError, match="cannot select 5 of 4"):
        top_layers(scores, [2, 3, 4, 5], 5)


def test_layer_scores_of_a_tiny_model_match_its_hidden_states():
    """The classifier's layer scores are the scores of the unprompted model's layer outputs, as
    transformers' own output_hidden_states gives them (hidden_states[ℓ + 1] is layer ℓ's output)."""
    backbone = tiny_backbone(THREE_LAYERS)
    head = VerbalizerHead.from_label_words(backbone, [["bad"], ["good"]])
    clf = TextPromptClassifier(backbone, PrefixPrompt(torch.zeros(3, 2, 2, 1, 16), 0), head, "{text} [MASK]")
    batch = clf.encode_texts(["apple river", "car", "the forest of trains", "cherry cherry", "plane"])
    out = backbone.model.base_model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    by_hand = []
    for layer in range(3):
        x = (out.hidden_states[layer + 1].double() * mask[..., None]).reshape(5, -1)
        x = x / x.norm(dim=1, keepdim=True)
        lam = torch.linalg.eigvalsh(x @ x.T).clamp(min=0) + EPSILON
        by_hand.append(float((lam.log() + 1 / lam).sum()))
    assert clf.layer_scores(batch, [0, 1, 2]) == pytest.approx(by_hand, rel=1e-6)
    assert clf.layer_scores(batch, [2]) == pytest.approx(by_hand[2:], rel=1e-6)


def test_a_prefix_on_chosen_layers_prompts_only_those():
    """A prefix on layers [0, 2] changes layer 0's and layer 2's attention and leaves layer 1 as the
    unprompted model computes it (from its own input)."""
    backbone = tiny_backbone(THREE_LAYERS)
    head = VerbalizerHead.from_label_words(backbone, [["bad"], ["good"]])
    prefix = torch.randn(2, 2, 2, 3, 16, generator=torch.Generator().manual_seed(0))
    clf = TextPromptClassifier(backbone, PrefixPrompt(prefix, 0, [0, 2]), head, "{text} [MASK]").eval()
    batch = clf.encode_texts(["apple river car"])  # one row: no padding, so no mask to repeat here
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        backbone.layers[i].attention.self.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out[0]))
        )
        for i in range(3)
    ]
    try:
        with torch.no_grad():
            clf(batch)
            prompted = dict(seen)
            for i in range(3):
                plain = backbone.layers[i].attention.self(prompted[i][0], attention_mask=None)[0]
                assert torch.allclose(plain, prompted[i][1], atol=1e-6) == (i == 1), i
    finally:
        for hook in hooks:
            hook.remove()
    with pytest.raises(ValueError, match="ascending"):
        PrefixPrompt(prefix, 2, [2, 0])
    with pytest.raises(ValueError, match="not the first of"):
        PrefixPrompt(prefix, 1, [0, 2])


def test_selected_layers_are_the_only_ones_trained_and_sent(keyword_file):
    """select_layers: 2 of 3 layers by score; the prompt state holds those layers' prefixes only
    (2/3 of the bytes up of every layer's), and the run records which layers and their scores."""
    prompt = {"kind": "deep", "mode": "prefix", "num_tokens": 4, "init": "random", "init_std": 0.5}

    def run(**extra):
        config = tiny_run_config(keyword_file, prompt={**prompt, **extra}, federation={"rounds": 1})
        config["backbone"]["random_config"] = THREE_LAYERS
        return fedprompt.run(config, write=False)

    every, chosen = run(), run(select_layers=2)
    layers = chosen.summary["prompt_layers"]
    scores = {int(k): v for k, v in chosen.summary["layer_scores"].items()}
    assert sorted(scores) == [0, 1, 2] and len(layers) == 2
    assert layers == sorted(sorted(scores, key=lambda k: -scores[k])[:2])
    assert (
        chosen.final_state["prompt.prefix"].shape[0] == 2 and every.final_state["prompt.prefix"].shape[0] == 3
    )
    up = "bytes_up_per_client_round"
    assert chosen.summary[up] < 0.7 * every.summary[up]
    explicit = run(layers=layers)
    assert torch.equal(explicit.final_state["prompt.prefix"], chosen.final_state["prompt.prefix"])


def test_layer_choices_are_checked():
    base = {"kind": "deep", "mode": "prefix"}
    with pytest.raises(ConfigError, match="not both"):
        load_config({"prompt": {**base, "layers": [1], "select_layers": 1}})
    with pytest.raises(ConfigError, match="ascending list"):
        load_config({"prompt": {**base, "layers": [3, 1]}})
    with pytest.raises(ConfigError, match="prefix_dropout applies to mode: prefix"):
        load_config({"prompt": {**base, "mode": "replace", "prefix_dropout": 0.1}})
    from fedprompt.tasks.registry import build_experiment

    with pytest.raises(ConfigError, match=r"prompt\.layers: 9 is past the last layer"):
        build_experiment(load_config({"prompt": {**base, "layers": [1, 9]}}))
    with pytest.raises(ConfigError, match="select_layers: 7 layers cannot be chosen"):
        build_experiment(load_config({"prompt": {**base, "select_layers": 7}}))
    with pytest.raises(ConfigError, match="runs in-process only"):
        build_experiment(load_config({"prompt": {**base, "select_layers": 2}}), client_ids=[])


# ----------------------------------------------------------------------------- the deep-prompt review points


def test_shared_tokens_split_a_prefix_prompt():
    """personalization.shared_tokens splits P-tuning v2's prefixes too: k of the m key/value slots
    of every layer are aggregated, the rest stay on the client (the state name ends in 'prefix')."""
    prefix = torch.arange(2 * 2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 2, 1, 3, 2)
    initial = {"prompt.prefix": prefix}
    config = load_config({"personalization": {"shared_tokens": 1}, "partition": {"local_val_fraction": 0.2}})
    split = prompt_split(config.personalization, initial)
    assert torch.equal(split.wire(initial)["prompt.prefix"], prefix[..., :1, :])
    assert torch.equal(split.local(initial)["local/prompt.prefix"], prefix[..., 1:, :])
    assert torch.equal(split.join(split.wire(initial), split.local(initial))["prompt.prefix"], prefix)


def test_prefix_dropout_acts_in_training_only():
    backbone = tiny_backbone(THREE_LAYERS)
    config = load_config(
        {"prompt": {"kind": "deep", "mode": "prefix", "num_tokens": 4, "prefix_dropout": 0.5}}
    )
    prompt = build_prompt(config.prompt, backbone, seed=0)
    torch.manual_seed(0)
    prompt.train()
    dropped = prompt().prefix
    assert 0 < int((dropped == 0).sum()) < dropped.numel()
    prompt.eval()
    assert torch.equal(prompt().prefix, prompt.prefix)


# ----------------------------------------------------------------------------- client moments


def test_adamw_resumed_from_its_state_continues_bit_for_bit():
    """Two runs of 3 steps, the second resumed from the first's optimizer_state, end exactly where
    one run of 6 steps does; a fresh optimiser (FedAvg's) does not."""
    target = torch.tensor([1.0, -2.0, 0.5])
    batches = [torch.tensor([float(i)]) for i in range(6)]

    def loss(batch):
        return ((theta - target * (1 + batch)) ** 2).sum(), 1

    settings = GradientSettings(algorithm="adamw", lr=0.1, epochs=1, grad_clip=None, keep_state=True)
    theta = torch.zeros(3, requires_grad=True)
    GradientOptimizer(settings).run([theta], loss, lambda e: batches)
    straight = theta.detach().clone()
    theta = torch.zeros(3, requires_grad=True)
    first = GradientOptimizer(settings).run([theta], loss, lambda e: batches[:3], resume={})
    assert sorted(first.optimizer_state) == ["0/exp_avg", "0/exp_avg_sq", "0/step"]
    assert first.optimizer_state["0/step"].tolist() == [3.0]
    GradientOptimizer(settings).run([theta], loss, lambda e: batches[3:], resume=first.optimizer_state)
    assert torch.equal(theta.detach(), straight)
    theta = torch.zeros(3, requires_grad=True)
    GradientOptimizer(settings).run([theta], loss, lambda e: batches[:3], resume={})
    GradientOptimizer(settings).run([theta], loss, lambda e: batches[3:], resume={})
    assert not torch.equal(theta.detach(), straight)
    with pytest.raises(ValueError, match="has shape"):
        GradientOptimizer(settings).run(
            [torch.zeros(2, requires_grad=True)], loss, lambda e: [], resume=first.optimizer_state
        )


@pytest.mark.slow
def test_fedpeptao_carries_client_moments_and_resumes_bit_for_bit(keyword_file, tmp_path):
    """FedPepTAO on a deep prompt over the selected layers: each client's AdamW moments are client
    state (checkpointed), the server's v, c and c_i strategy state; a run stopped after round 1 and
    resumed ends bit for bit where the straight run does, every client's moments included."""

    def config(rounds: int) -> dict:
        prompt = {"kind": "deep", "mode": "prefix", "num_tokens": 4, "init": "random", "select_layers": 2}
        raw = tiny_run_config(
            keyword_file,
            prompt=prompt,
            strategy={"kind": "fedpeptao"},
            optimizer={"lr": 0.05},
            federation={"rounds": rounds},
        )
        raw["backbone"]["random_config"] = THREE_LAYERS
        return raw

    straight = fedprompt.run(config(3), output_dir=tmp_path / "a")
    partial = fedprompt.run(config(1), output_dir=tmp_path / "b")
    resumed = fedprompt.run(resume=partial.run_dir, overrides=["federation.rounds=3"])
    assert torch.equal(resumed.final_state["prompt.prefix"], straight.final_state["prompt.prefix"])
    a = load_file(straight.run_dir / "checkpoint.safetensors")
    b = load_file(resumed.run_dir / "checkpoint.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    moments = [k for k in a if k.startswith("client/") and "/optimizer/" in k]
    assert sorted({k.split("/")[1] for k in moments}) == ["0", "1", "2", "3"]
    assert a["client/0/optimizer/0/step"].item() > 0 and a["client/0/optimizer/0/exp_avg"].abs().sum() > 0
    assert any(k.startswith("strategy/ci/") for k in a) and "strategy/t/aggregations" in a
    accuracy = straight.metric("global_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy


# ----------------------------------------------------------------------------- the server's update


def test_fedpeptao_server_step_by_hand():
    s = FedPepTAO(
        4,
        LocalStepBound(epochs=4, batch_size=1),
        0.5,
        server_lr=2.0,
        momentum=0.5,
        server_lr_decay=0.5,
        min_server_lr=0.75,
    )
    x = {"p": t(0, 0)}
    s.initialize(x)
    updates = [
        Update(0, {"p": t(1, 2)}, 1, {"steps": 2.0}),
        Update(1, {"p": t(3, -2)}, 3, {"steps": 4.0}),
    ]
    out = s.aggregate(x, updates)
    # θ̄ = 0.25·[1, 2] + 0.75·[3, −2] = [2.5, −1]; c = c_i = 0: no correction, θ̃ = θ̄
    # c_0 = −[1, 2]/(2·0.5) = [−1, −2]; c_1 = −[3, −2]/(4·0.5) = [−1.5, 1]; c = (2/4)·(0.25 c_0 + 0.75 c_1)
    # v = 0.5·(θ − θ̃) = [−1.25, 0.5]; θ = θ̃ − 2·v = [5, −2]
    assert torch.equal(out["p"], t(5, -2))
    state = s.state_dict()
    assert torch.equal(state["ci/0/p"], t(-1, -2)) and torch.equal(state["ci/1/p"], t(-1.5, 1))
    assert torch.equal(state["c/p"], t(-0.6875, 0.125))
    # round 2, client 0 alone: correction w τ η (c − c_0) = 1·1·0.5·([−0.6875, 0.125] − [−1, −2])
    out = s.aggregate(out, [Update(0, {"p": t(6, -2)}, 1, {"steps": 1.0})])
    corr = 0.5 * (t(-0.6875, 0.125) - t(-1, -2))
    tilde = t(6, -2) - corr
    v = 0.5 * t(-1.25, 0.5) + 0.5 * (t(5, -2) - tilde)
    assert torch.allclose(out["p"], tilde - 1.0 * v, rtol=1e-7, atol=0)  # η_s = max(2·0.5, 0.75) = 1
    assert s.report() == {"fedpeptao_server_lr": 1.0}
    resumed = FedPepTAO(4, LocalStepBound(1, 1), 0.5, 2.0, 0.5, 0.5, 0.75)
    resumed.initialize(x)
    resumed.load_state_dict(s.state_dict())
    assert resumed.current_server_lr() == 0.75 and resumed.state_dict().keys() == s.state_dict().keys()
    with pytest.raises(ValueError, match="from 1 to 4"):
        s.validate_update(Update(0, {"p": t(0, 0)}, 1, {"steps": 5.0}))


def test_fedpeptao_config_keeps_client_moments_by_default():
    run = RunConfig.model_validate({"strategy": {"kind": "fedpeptao"}, "partition": {"num_clients": 5}})
    assert run.optimizer.keep_state is True
    assert isinstance(build_strategy(FedPepTAOConfig(), run=run), FedPepTAO)
    assert RunConfig().optimizer.keep_state is False
    with pytest.raises(ValueError, match="black-box"):
        RunConfig.model_validate(
            {
                "strategy": {"kind": "fedpeptao"},
                "prompt": {"kind": "intrinsic"},
                "optimizer": {"kind": "cmaes"},
            }
        )
