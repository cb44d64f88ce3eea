"""The open_clip backbone: loading (checkpoint file, tags, errors), freezing, and its seams."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from clip_support import TINY_CLIP
from safetensors.torch import save_file

from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.hf_text import BackboneLoadError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint))


def test_checkpoint_file_loads_through_pretrained(tiny_clip, backbone):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_clip.checkpoint))
    loaded = backbone.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert backbone.weights.startswith("file-sha256-") and len(backbone.weights) == len("file-sha256-") + 64
    assert backbone.name == "fedprompt-tiny-clip"


def test_backbone_is_frozen_in_eval_mode_and_reports_its_shapes(backbone):
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert (backbone.embed_dim, backbone.text_width, backbone.vision_width) == (32, 64, 64)
    assert (backbone.num_text_layers, backbone.num_vision_layers, backbone.context_length) == (2, 2, 77)
    assert backbone.image_size == (32, 32) and backbone.patch_size == (8, 8)
    assert backbone.short_text and backbone.is_vit
    assert backbone.logit_scale.item() == pytest.approx(100.0, rel=1e-5)
    assert backbone.num_bytes() == sum(p.numel() * 4 for p in backbone.model.parameters()) + 77 * 77 * 4


def test_random_weights_are_seeded(tiny_clip):
    a = OpenCLIPBackbone.load(str(tiny_clip.config), None, seed=3)
    b = OpenCLIPBackbone.load(str(tiny_clip.config), None, seed=3)
    c = OpenCLIPBackbone.load(str(tiny_clip.config), None, seed=4)
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)
    assert a.weights == "random-seed-3"


def test_shortened_text_pass_equals_the_full_pass_and_open_clip(backbone):
    texts = ["a photo of a cat.", "dog", "a very long description of a small red bird on a branch"]
    ids = backbone.tokenize(texts)
    embeddings = backbone.token_embeddings(ids)
    with torch.no_grad():
        short = backbone.text_features(embeddings, ids)
        full = backbone.text_features(embeddings, ids, full_length=True)
        reference = backbone.model.encode_text(ids)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, reference, atol=1e-6, rtol=1e-6)
    assert int(backbone.pooled_positions(ids).max()) + 1 < 20  # the pass ran on < 20 of 77 positions


def test_shortened_pass_is_off_for_towers_without_a_causal_mask(tmp_path):
    config = json.loads(json.dumps(TINY_CLIP))
    config["text_cfg"].update(no_causal_mask=True, pool_type="last")
    path = tmp_path / "tiny-bidirectional-clip.json"
    path.write_text(json.dumps(config))
    backbone = OpenCLIPBackbone.load(str(path), None)
    assert not backbone.short_text
    ids = backbone.tokenize(["a photo of a cat."])
    with torch.no_grad():
        ours = backbone.text_features(backbone.token_embeddings(ids), ids)
        torch.testing.assert_close(ours, backbone.model.encode_text(ids), atol=1e-6, rtol=1e-6)


def test_vision_seams_compose_to_the_image_tower(backbone):
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = backbone.image_embeddings(pixels)
        assert hidden.shape == (3, 1 + 16, 64)
        halfway = backbone.vision_layers(hidden, 0, 1)
        out = backbone.image_head(backbone.vision_layers(halfway, 1))
        torch.testing.assert_close(out, backbone.encode_image(pixels), atol=1e-6, rtol=1e-6)


def test_offline_tag_error_names_model_tag_and_the_local_file_fix():
    with pytest.raises(BackboneLoadError) as info:
        OpenCLIPBackbone.load("ViT-B-32", "openai")  # HF_HUB_OFFLINE=1: no download
    message = str(info.value)
    assert "'ViT-B-32'" in message and "pretrained='openai'" in message
    assert "backbone.pretrained to that file's path" in message


def test_load_errors(tmp_path, tiny_clip):
    with pytest.raises(BackboneLoadError, match=r"neither a pretrained tag .* \(its tags: \[.openai."):
        OpenCLIPBackbone.load("ViT-B-32", "no-such-tag")
    with pytest.raises(BackboneLoadError, match=r"nor an existing checkpoint file"):
        OpenCLIPBackbone.load(str(tiny_clip.config), str(tmp_path / "missing.safetensors"))
    with pytest.raises(BackboneLoadError, match=r"open_clip has no model 'No-Such-Model'"):
        OpenCLIPBackbone.load("No-Such-Model", None)
    with pytest.raises(BackboneLoadError, match=r"model config file .*absent.json' does not exist"):
        OpenCLIPBackbone.load(str(tmp_path / "absent.json"), None)
    broken = tmp_path / "broken.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(broken))
    with pytest.raises(BackboneLoadError, match=r"could not load open_clip model 'fedprompt-tiny-clip'"):
        OpenCLIPBackbone.load(str(tiny_clip.config), str(broken))
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenCLIPBackbone.load(str(tiny_clip.config), None, precision="fp8")


def test_tower_without_vit_rejects_token_prompts_with_a_clear_error(tmp_path):
    config = json.loads(json.dumps(TINY_CLIP))
    config["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    path = tmp_path / "tiny-resnet-clip.json"
    path.write_text(json.dumps(config))
    backbone = OpenCLIPBackbone.load(str(path), None)
    assert not backbone.is_vit
    assert backbone.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    with pytest.raises(ValueError, match="VPT prompts need an open_clip VisionTransformer image tower"):
        backbone.image_embeddings(torch.randn(1, 3, 32, 32))


def test_model_config_file_is_registered_with_open_clip(tiny_clip, backbone):
    assert "fedprompt-tiny-clip" in open_clip.list_models()
    assert open_clip.get_model_config("fedprompt-tiny-clip")["vision_cfg"]["width"] == 64


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_towers_keep_the_prompt_in_float32(tiny_clip, precision):
    from prompt_modules.clip_classifier import CLIPPromptClassifier
    from prompt_modules.clip_text_context import TextContext
    from prompt_modules.visual_prompts import VisualTokenPrompt, vpt_init

    backbone = OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint), precision=precision)
    assert (
        backbone.dtype
        == backbone.image_dtype
        == getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])
    )
    prompts = vpt_init(backbone, 2, 3, torch.Generator().manual_seed(0))
    model = CLIPPromptClassifier(
        backbone, TextContext(torch.zeros(4, 64)), VisualTokenPrompt(prompts), ["a", "b"]
    )
    logits = model({"pixels": torch.randn(2, 3, 32, 32)})
    logits.sum().backward()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
