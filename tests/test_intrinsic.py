"""Intrinsic prompts: what the state holds, the projection a seed fixes, population evaluation."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from prompt_modules.base import PopulationModule
from prompt_modules.heads import SimilarityHeadSpec, VerbalizerHeadSpec, build_head
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier, ProjectionSpec, make_projection
from prompt_modules.soft_prompt import TextPrompt

from conftest import TINY_BERT, TINY_GPT2, tiny_backbone

TEXTS = ["a fine film", "awful", "what a movie it was", "the plot"]
SPEC = ProjectionSpec(seed=11, dim=40, num_tokens=3, scale=1.0)


def _classifier(backbone, head_kind: str = "verbalizer", chunk_size: int = 2, spec: ProjectionSpec = SPEC):
    if head_kind == "similarity":
        head = SimilarityHeadSpec(descriptions=("It was bad.", "It was good."))
        template = "{text}"
    else:
        head = VerbalizerHeadSpec(label_words=(("bad",), ("good",)))
        template = "{text} It was" if backbone.is_decoder else "{text} It was [MASK]."
    prompt = IntrinsicPrompt.from_backbone(backbone, spec)
    return IntrinsicTextClassifier(backbone, prompt, build_head(backbone, head), template, chunk_size).eval()


@functools.cache
def _backbone(name: str, head: str = "lm"):
    return tiny_backbone({"bert": TINY_BERT, "gpt2": TINY_GPT2}[name], head=head)


@pytest.fixture(scope="module")
def bert():
    return _backbone("bert")


def test_state_holds_z_alone_and_starts_at_zero(bert):
    clf = _classifier(bert)
    assert list(clf.state_dict()) == ["prompt.z"]
    assert clf.prompt_state()["prompt.z"].shape == (40,) and not clf.prompt.z.any()
    assert isinstance(clf, PopulationModule)
    assert clf.prompt().input.shape == (3, 32)


def test_projection_is_fixed_by_the_seed_and_scaled_like_bbt(bert):
    a1, p1 = make_projection(SPEC, bert.embedding_matrix)
    a2, _ = make_projection(SPEC, bert.embedding_matrix)
    a3, _ = make_projection(SPEC.model_copy(update={"seed": 12}), bert.embedding_matrix)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert a1.shape == (3 * 32, 40) and not p1.any()
    wide = ProjectionSpec(seed=0, dim=400, num_tokens=20, scale=2.0)
    big, _ = make_projection(wide, bert.embedding_matrix)
    emb_std = float(bert.embedding_matrix.float().std(correction=0))
    assert float(big.std()) == pytest.approx(2.0 * emb_std / math.sqrt(400), rel=0.02)


def test_vocab_offset_is_made_of_ordinary_token_embeddings(bert):
    spec = SPEC.model_copy(update={"p0": "vocab"})
    _, offset = make_projection(spec, bert.embedding_matrix, tuple(bert.tokenizer.all_special_ids))
    table = bert.embedding_matrix.detach()
    for row in offset:
        hits = (table == row).all(1).nonzero().flatten().tolist()
        assert hits and not set(hits) & set(bert.tokenizer.all_special_ids)
    prompt = IntrinsicPrompt.from_backbone(bert, spec)
    torch.testing.assert_close(prompt().input, offset)  # z = 0: the prompt is p0


@pytest.mark.parametrize(
    ("config", "head_kind"), [("bert", "verbalizer"), ("bert", "similarity"), ("gpt2", "verbalizer")]
)
@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_population_evaluation_equals_one_by_one(config, head_kind, chunk_size):
    backbone = _backbone(config, "lm" if head_kind == "verbalizer" else "none")
    clf = _classifier(backbone, head_kind, chunk_size)
    batch = {**clf.encode_texts(TEXTS), "labels": torch.tensor([1, 0, 1, 0])}
    candidates = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    together = clf.population_logits(candidates, batch)
    assert together.shape == (5, 4, 2) and not together.requires_grad
    for p in range(5):
        with torch.no_grad():
            alone = clf.logits_for(TextPrompt(input=clf.prompt.project(candidates[p])), batch)
        torch.testing.assert_close(together[p], alone, atol=1e-5, rtol=1e-4)
    losses = clf.population_losses(candidates, batch)
    expected = torch.stack([F.cross_entropy(together[p], batch["labels"]) for p in range(5)])
    torch.testing.assert_close(losses, expected)


def test_z_changes_the_prompt_and_takes_gradients(bert):
    clf = _classifier(bert)
    batch = clf.encode_texts(TEXTS)
    before = clf(batch).detach()
    clf(batch).sum().backward()
    assert clf.prompt.z.grad is not None and clf.prompt.z.grad.abs().sum() > 0
    with torch.no_grad():
        clf.prompt.z.add_(5.0)
    assert not torch.allclose(before, clf(batch))


def test_bad_shapes_are_named(bert):
    clf = _classifier(bert)
    with pytest.raises(ValueError, match="z has 39 entries, this projection takes 40"):
        clf.prompt.project(torch.zeros(39))
    with pytest.raises(ValueError, match=r"candidates must be \[P, d\]"):
        clf.population_logits(torch.zeros(40), clf.encode_texts(TEXTS))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        clf.logits_for_prompts(torch.zeros(2, 3, 32), clf.encode_texts(TEXTS), 0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        IntrinsicPrompt(torch.zeros(96, 1), torch.zeros(3, 32))
