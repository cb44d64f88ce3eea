"""`fedprompt export --format peft`: the adapter loads in PEFT and gives fedprompt's logits; refusals.

The comparison builds PEFT's class logits from the PEFT model's own outputs (last hidden states or
LM logits) through a head made from the exported ``fedprompt_head.json`` alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fedprompt
from fedprompt.cli import app
from fedprompt.config import load_config
from fedprompt.execution.results import RunDirectory
from fedprompt.tasks.text.parts import build_head, load_backbone
from prompt_modules.soft_prompt import SoftPrompt
from prompt_modules.text_classifier import (
    SimilarityHead,
    TextPromptClassifier,
    VerbalizerHead,
    pad_right,
    pool,
)

from conftest import KEYWORDS, TINY_BERT, TINY_LLAMA, tiny_backbone, tiny_run_config, write_keyword_dataset

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5
TEXTS = ["apple", "the river of mountain forest", "car train", "a cherry banana plane", "of the forest"]
SIMILARITY = {"kind": "similarity", "template": "{text}", "description_template": "{label}"}


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl", n=120)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Tiny random BERT (masked LM) and Llama models saved as local folders, as PEFT loads them."""
    folders = {}
    for name, random_config in (("bert", TINY_BERT), ("llama", TINY_LLAMA)):
        backbone = tiny_backbone({**random_config, "initializer_range": 0.3})
        folder = tmp_path_factory.mktemp(name)
        backbone.model.save_pretrained(folder)
        backbone.tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def _fedprompt_logits(run_dir, texts):
    """Class logits of the run's final prompt through fedprompt's own module, and that module."""
    cfg = load_config(RunDirectory(run_dir).read_config())
    labels = json.loads((run_dir / "summary.json").read_text())["label_names"]
    backbone = load_backbone(cfg.backbone, cfg.head.kind, cfg.seed)
    prompt = SoftPrompt(load_file(str(run_dir / "final_prompt.safetensors"))["prompt.embeddings"])
    head = build_head(cfg.head, backbone, labels)
    model = TextPromptClassifier(backbone, prompt, head, cfg.head.template, cfg.prompt.placement).eval()
    batch = model.encode_texts(texts)
    with torch.no_grad():
        return model(batch), batch, backbone


def _peft_logits(base_folder, adapter, batch, backbone):
    """Class logits from the PEFT model's outputs on the same (right-padded) token ids, scored by a head
    built from the exported head file alone."""
    import transformers

    side = json.loads((adapter / "fedprompt_head.json").read_text())
    base = getattr(transformers, side["load_with"]).from_pretrained(base_folder).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    m, rows = side["num_virtual_tokens"], torch.arange(ids.shape[0])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        if side["kind"] == "similarity":
            descriptions = [side["descriptions"][label] for label in side["labels"]]
            d_ids, d_mask = pad_right(backbone.tokenize(descriptions), backbone.tokenizer.pad_token_id)
            # the base model without virtual tokens (PEFT 0.21's disable_adapter() fails on encoders)
            encoded = model.get_base_model()(input_ids=d_ids, attention_mask=d_mask).last_hidden_state
            head = SimilarityHead(
                pool(encoded, d_mask, side["pooling"]), side["temperature"], side["pooling"]
            )
            full_mask = torch.cat([torch.ones(ids.shape[0], m, dtype=mask.dtype), mask], dim=1)
            return head(out.last_hidden_state, full_mask, side["cls_index"]), model
        words = [side["label_words"][label] for label in side["labels"]]
        head = VerbalizerHead.from_label_words(backbone, words)
        if backbone.is_decoder:  # the next token after each row's last real token
            positions = m + mask.sum(1) - 1
        else:
            positions = m + (ids == backbone.tokenizer.mask_token_id).int().argmax(1)
        return head(out.logits[rows, positions]), model


@pytest.mark.parametrize(
    ("model", "variant"),
    [
        ("bert", {"head": SIMILARITY}),
        ("bert", {"head": {**SIMILARITY, "pooling": "cls"}}),
        ("bert", {}),  # masked-LM verbaliser at [MASK]
        ("llama", {"head": {"template": "{text} is"}}),  # decoder verbaliser, next token
    ],
    ids=["encoder-similarity-mean", "encoder-similarity-cls", "encoder-mlm", "decoder-lm"],
)
def test_a_trained_prompt_exported_to_peft_gives_fedprompts_logits(
    model, variant, model_folders, keyword_file, tmp_path
):
    config = tiny_run_config(
        keyword_file,
        backbone={"model": str(model_folders[model]), "random_config": None},
        prompt={"placement": "before-all"},
        federation={"rounds": 1},
        **variant,
    )
    run_dir = fedprompt.run(config, output_dir=tmp_path / "runs").run_dir
    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", str(run_dir), str(adapter), "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert "fedprompt_head.json" in result.output and "not part of a PEFT adapter" in result.output

    expected, batch, backbone = _fedprompt_logits(run_dir, TEXTS)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # rows of different lengths: padding
    got, peft_model = _peft_logits(model_folders[model], adapter, batch, backbone)
    assert type(peft_model).__name__ == (
        "PeftModelForCausalLM" if model == "llama" else "PeftModelForFeatureExtraction"
    )
    assert got.shape == expected.shape == (len(TEXTS), len(KEYWORDS))
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert expected.std() > 0.01  # the logits differ between inputs and classes: the test can fail

    stored = load_file(str(adapter / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "final_prompt.safetensors"))["prompt.embeddings"]
    assert list(stored) == ["prompt_embeddings"] and torch.equal(stored["prompt_embeddings"], final)


def test_the_placement_is_what_peft_needs(model_folders, keyword_file, tmp_path):
    """An encoder prompt after [CLS] gives other logits in PEFT's layout: which is why export refuses it."""
    config = tiny_run_config(
        keyword_file, backbone={"model": str(model_folders["bert"]), "random_config": None}
    )
    cfg = load_config(config)
    backbone = load_backbone(cfg.backbone, cfg.head.kind, cfg.seed)
    head = build_head(cfg.head, backbone, list(KEYWORDS))
    prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))
    after, before = (
        TextPromptClassifier(backbone, prompt, head, cfg.head.template, placement).eval()
        for placement in ("after-cls", "before-all")
    )
    batch = after.encode_texts(TEXTS)
    assert after.prompt_position == 1 and before.prompt_position == 0
    with torch.no_grad():
        assert (after(batch) - before(batch)).abs().max() > 0.01


@pytest.mark.slow
def test_the_bundled_minilm_prompt_exports_exactly(tmp_path):
    from prompt_modules.bundled import resolve_model_name

    folder = RunDirectory.create(tmp_path, "minilm")
    folder.write_config(load_config(overrides=["prompt.placement=before-all", "head.pooling=mean"]))
    prompt = torch.randn(8, 384, generator=torch.Generator().manual_seed(0)) * 0.05
    folder.save_final({"prompt.embeddings": prompt})
    folder.write_summary({"label_names": ["greetings", "food", "sports", "science"]})
    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", str(folder.path), str(adapter)])
    assert result.exit_code == 0, result.output

    texts = ["hello there, how are you?", "I like pasta", "who won the match", "what is an atom"]
    expected, batch, backbone = _fedprompt_logits(folder.path, texts)
    got, _ = _peft_logits(resolve_model_name("bundled:all-MiniLM-L6-v2", None)[0], adapter, batch, backbone)
    assert (got - expected).abs().max().item() <= TOLERANCE
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["num_virtual_tokens"] == 8 and config["token_dim"] == 384 and config["num_layers"] == 6


def _fabricated_run(tmp_path, config: dict | None, overrides=(), final=True):
    folder = RunDirectory.create(tmp_path / "runs", "x")
    folder.write_config(load_config(config, list(overrides)))
    if final:
        save_file({"prompt.embeddings": torch.zeros(4, 384)}, str(folder.path / "final_prompt.safetensors"))
        folder.write_summary({"label_names": ["a", "b"]})
    return folder.path


CLIP = {"backbone": {"kind": "open-clip"}, "prompt": {"kind": "coop"}, "data": {"source": "hub", "name": "x"}}


@pytest.mark.parametrize(
    ("config", "overrides", "final", "reason"),
    [
        (None, [], True, "trained after [CLS] (prompt.placement: after-cls)"),
        (None, ["prompt.kind=deep"], True, "a deep prompt replaces the prompt positions"),
        (None, ["prompt={kind: intrinsic}"], True, "an intrinsic prompt is a vector z"),
        (CLIP, [], True, "prompt.kind 'coop' on a open-clip backbone has no PEFT counterpart"),
        (None, ["prompt.placement=before-all"], False, "has no final_prompt.safetensors"),
    ],
    ids=["encoder-after-cls", "deep", "intrinsic", "clip", "unfinished"],
)
def test_export_refuses_what_peft_cannot_hold_with_the_reason(config, overrides, final, reason, tmp_path):
    run_dir = _fabricated_run(tmp_path, config, overrides, final)
    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", str(run_dir), str(adapter)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and reason in result.output
    assert not adapter.exists()
