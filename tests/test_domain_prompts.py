"""FedAPT's keyed prompts and test-time mixture, Fed-DPT's attention-weighted domains and its
aggregation, against hand computations on a tiny random CLIP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip_support import write_tiny_clip_config

from fedprompt.federation.client_rules import RoundInputs
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fed_dpt import EXTERNAL, TEXT, FedDPT, FedDPTRule
from optimizers.base import OptimizationStats
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_text_context import TextContext, context_class_features
from prompt_modules.domain_prompts import (
    DOMAIN,
    AdaptivePromptClassifier,
    DomainContexts,
    DualPromptClassifier,
    keyed_contexts,
)
from prompt_modules.visual_prompts import VisualTokenPrompt, vpt_init

pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return OpenCLIPBackbone.load(str(write_tiny_clip_config(tmp_path_factory.mktemp("clip"))), None, seed=0)


# --------------------------------------------------------------------------- FedAPT


def test_keyed_context_is_ctx_plus_ctx_times_the_weighted_keys():
    ctx = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    keys = torch.tensor([[[0.5, 0.0], [0.0, 1.0]], [[0.0, 0.25], [1.0, 0.0]]])
    # client 0 trains with its own key: ctx + ctx ⊙ k_0
    own = keyed_contexts(ctx, keys, torch.tensor([[1.0, 0.0]]))
    assert torch.equal(own[0], torch.tensor([[1.5, 2.0], [3.0, -2.0]]))
    # a test image with w = (0.2, 0.8): Σ w k = [[0.1, 0.2], [0.8, 0.2]], so ctx ⊙ (1 + Σ w k)
    mixed = keyed_contexts(ctx, keys, torch.tensor([[0.2, 0.8]]))
    assert torch.allclose(mixed[0], torch.tensor([[1.1, 2.4], [5.4, -1.2]]))
    # class-specific context [C, M, d]: every class keyed alike
    per_class = keyed_contexts(torch.stack([ctx, 2 * ctx]), keys, torch.tensor([[0.2, 0.8]]))
    assert per_class.shape == (1, 2, 2, 2) and torch.allclose(per_class[0, 1], 2 * mixed[0])


def _fedapt(backbone, mixture: str = "prompt", temperature: float = 0.5) -> AdaptivePromptClassifier:
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(len(NAMES), 2, backbone.text_width, generator=generator) * 0.02
    keys = torch.rand(3, 2, backbone.text_width, generator=generator)
    model = AdaptivePromptClassifier(
        backbone, TextContext(context, class_names=NAMES), keys, NAMES, temperature, mixture
    )
    with torch.no_grad():
        model.adaptive.weight.copy_(torch.randn(model.adaptive.weight.shape, generator=generator))
    return model


def _hand_weights(model: AdaptivePromptClassifier, features: torch.Tensor) -> torch.Tensor:
    """softmax(standardise(W f) / t) by the formula, one image at a time."""
    rows = []
    for scores in (features @ model.adaptive.weight.T).tolist():
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
        exps = [math.exp((s - mean) / std / model.temperature) for s in scores]
        rows.append([e / sum(exps) for e in exps])
    return torch.tensor(rows)


def _class_features(model: AdaptivePromptClassifier, context: torch.Tensor) -> torch.Tensor:
    tokens = model.text.tokens_for(model.backbone, NAMES)
    return F.normalize(context_class_features(model.backbone, tokens, context), dim=-1)


def test_fedapt_trains_each_clients_key_and_mixes_the_keys_per_test_image(backbone):
    model = _fedapt(backbone)
    features = torch.randn(4, backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    image = F.normalize(features, dim=-1)
    scale = backbone.logit_scale
    assert sorted(model.state_dict()) == ["adaptive.weight", "text.context"]  # the keys never travel

    model.train()
    batch = {"image_features": features, DOMAIN: torch.tensor([2, 0, 2, 1])}
    logits = model(batch)
    ctx, keys = model.text.context.detach(), model.keys
    for row, key in enumerate([2, 0, 2, 1]):
        expected = scale * image[row] @ _class_features(model, ctx + ctx * keys[key]).T
        assert torch.allclose(logits[row], expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs each example's domain"):
        model({"image_features": features})

    model.eval()
    weights = _hand_weights(model, features)
    assert torch.allclose(model.domain_weights({"image_features": features}), weights, atol=1e-5)
    with torch.no_grad():
        logits = model({"image_features": features})
    for row in range(4):
        mixed = ctx + ctx * torch.einsum("k,kmd->md", weights[row], keys)  # per image, domain unknown
        expected = scale * image[row] @ _class_features(model, mixed).T
        assert torch.allclose(logits[row], expected, atol=1e-4)

    cheap = _fedapt(backbone, "features").eval()
    with torch.no_grad():
        per_key = torch.stack([_class_features(cheap, ctx + ctx * keys[k]) for k in range(3)])
        mixed = F.normalize(torch.einsum("bk,kcd->bcd", weights, per_key), dim=-1)
        expected = scale * torch.einsum("bd,bcd->bc", image, mixed)
        assert torch.allclose(cheap({"image_features": features}), expected, atol=1e-4)
        # mixing features is the method only when the weights are one-hot (t -> 0)
        sharp_prompt = _fedapt(backbone, "prompt", 1e-4).eval()
        sharp_features = _fedapt(backbone, "features", 1e-4).eval()
        batch = {"image_features": features}
        assert torch.allclose(sharp_prompt(batch), sharp_features(batch), atol=1e-4)
        assert not torch.allclose(model(batch), cheap(batch), atol=1e-4)


# --------------------------------------------------------------------------- Fed-DPT


def test_class_attention_is_the_blocks_own_attention_renormalised(backbone):
    block = backbone.model.visual.transformer.resblocks[1]
    x = torch.randn(2, 7, backbone.vision_width, generator=torch.Generator().manual_seed(3))
    ours = backbone.vision_class_attention(1, x, slice(1, 4))
    normed = block.ln_1(x)
    _, probabilities = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
    theirs = probabilities[:, :, 0, 1:4]  # [B, heads, 3]: the class token's row, keys 1..3
    assert torch.allclose(ours, theirs / theirs.sum(-1, keepdim=True), atol=1e-5)


def _dual(backbone, domains: int = 3) -> DualPromptClassifier:
    generator = torch.Generator().manual_seed(4)
    contexts = torch.randn(domains, 2, backbone.text_width, generator=generator) * 0.02
    visual = VisualTokenPrompt(vpt_init(backbone, 1, domains, generator), 0)
    return DualPromptClassifier(backbone, DomainContexts(contexts), visual, NAMES)


def test_fed_dpt_weighs_each_domains_prediction_by_the_class_tokens_attention(backbone):
    model = _dual(backbone).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batch = {"image_tokens": model.prepare_images(pixels)}
    image, weights = model.image_features_and_weights(batch)
    assert weights.shape == (2, 3) and torch.allclose(weights.sum(1), torch.ones(2))
    everyone = model.text.features(backbone, NAMES, torch.arange(3))
    with torch.no_grad():
        logits = model(batch)
    for row in range(2):
        by_domain = [backbone.logit_scale * image[row] @ everyone[d].T for d in range(3)]
        expected = sum(weights[row, d] * by_domain[d] for d in range(3))
        assert torch.allclose(logits[row], expected, atol=1e-4)

    model.train()  # a client of domain 1 trains its own text prompt and the visual tokens only
    loss = F.cross_entropy(model({**batch, DOMAIN: torch.tensor([1, 1])}), torch.tensor([0, 2]))
    loss.backward()
    grad = model.text.context.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert model.image.prompts.grad.abs().sum() > 0


def test_fed_dpt_server_keeps_each_domains_prompt_from_its_own_clients():
    global_state = {TEXT: torch.zeros(3, 2, 2), "image.prompts": torch.zeros(1, 3, 4)}
    strategy = FedDPT({0: 0, 1: 1, 2: 1, 3: 0})

    def update(cid: int, value: float, n: int) -> Update:
        return Update(
            cid, {TEXT: torch.full((3, 2, 2), value), "image.prompts": torch.full((1, 3, 4), value)}, n, {}
        )

    new = strategy.aggregate(global_state, [update(2, 6.0, 30), update(0, 1.0, 10), update(1, 2.0, 10)])
    assert torch.equal(new[TEXT][0], torch.full((2, 2), 1.0))  # domain 0: client 0 alone (3 was not sampled)
    assert torch.equal(new[TEXT][1], torch.full((2, 2), (2.0 * 10 + 6.0 * 30) / 40))  # clients 1 and 2
    assert torch.equal(new[TEXT][2], torch.zeros(2, 2))  # no client of domain 2: kept
    assert torch.equal(new["image.prompts"], torch.full((1, 3, 4), (10 + 20 + 180) / 50))  # FedAvg of all
    uniform = FedDPT({0: 0, 1: 1, 2: 1}, "uniform").aggregate(
        global_state, [update(0, 1.0, 10), update(1, 2.0, 10), update(2, 6.0, 30)]
    )
    assert torch.equal(uniform[TEXT][1], torch.full((2, 2), 4.0))
    with pytest.raises(ValueError, match="client 9 has no known domain"):
        strategy.validate_update(update(9, 0.0, 1))


def test_fed_dpt_clients_follow_the_other_domains_by_momentum_and_carry_the_copy():
    rule = FedDPTRule({0: 0, 1: 2}, momentum=0.75)
    server = {TEXT: torch.tensor([[[4.0]], [[8.0]], [[12.0]]]), "image.prompts": torch.ones(1, 3, 1)}
    instructions = FitInstructions(round=1, seed=0)
    first = rule.start(RoundInputs(server, {}, instructions, client_id=1))
    assert torch.equal(first[TEXT], server[TEXT])  # before its first round: the server's prompts
    carried = {EXTERNAL: torch.tensor([[[0.0]], [[0.0]], [[100.0]]])}
    start = rule.start(RoundInputs(server, carried, instructions, client_id=1))
    # others: 0.75 · E + 0.25 · S; its own domain (2): the server's, as it is
    assert torch.equal(start[TEXT], torch.tensor([[[1.0]], [[2.0]], [[12.0]]]))
    assert torch.equal(start["image.prompts"], server["image.prompts"])
    out = rule.finish(RoundInputs(server, carried, instructions, client_id=1), start, OptimizationStats())
    assert torch.equal(out.carried[EXTERNAL], start[TEXT])
    with pytest.raises(ValueError, match="client 5 has no known domain"):
        rule.start(RoundInputs(server, {}, instructions, client_id=5))
