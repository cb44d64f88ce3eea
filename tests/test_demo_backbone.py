"""bundled:demo-clip: the offline demo CLIP is seeded, cached, reused, above chance zero-shot, loaded
through open_clip's pretrained=<file> path, and says what it is in every run that uses it."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from pydantic import ValidationError
from safetensors.torch import load_file

import fedprompt
from fedprompt.config import ConfigError, OpenCLIPBackboneConfig, load_config
from fedprompt.tasks.clip import demo_backbone
from fedprompt.tasks.clip.demo_backbone import DemoClipRecipe, demo_clip
from fedprompt.tasks.clip.parts import load_clip_backbone

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 1,
        "width": 64,
        "patch_size": 8,
        "head_width": 32,
        "pool_type": "avg",
        "final_ln_after_pool": True,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY = DemoClipRecipe(
    epochs=20,
    batch_size=32,
    lr=0.002,
    warmup_steps=5,
    digit_image_fraction=0.5,
    max_digit_images=140,
    max_shape_images=64,
    held_out_digits=("seven", "eight", "nine"),
    model=TINY_MODEL,
)
"""A test budget: a 1-layer CLIP, 140 digit and 64 easy-vqa images, 140 steps, three digits held out."""


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-cache")
    return folder, demo_clip(TINY, folder)


def test_same_recipe_same_weights_bit_for_bit(tmp_path):
    quick = replace(TINY, epochs=1)
    first, second = demo_clip(quick, tmp_path / "a"), demo_clip(quick, tmp_path / "b")
    assert first.built and second.built and first.folder.name == second.folder.name
    a, b = load_file(str(first.checkpoint_path)), load_file(str(second.checkpoint_path))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    other = demo_clip(replace(quick, seed=1), tmp_path / "a")
    assert other.folder != first.folder
    c = load_file(str(other.checkpoint_path))
    assert not all(a[k].equal(c[k]) for k in a)


def test_a_second_call_reuses_the_cache_without_training(tiny_demo):
    folder, built = tiny_demo
    assert built.built
    count, stamp = demo_backbone.build_count, built.checkpoint_path.stat().st_mtime_ns
    again = demo_clip(TINY, folder)
    assert not again.built and demo_backbone.build_count == count
    assert again.checkpoint_path.stat().st_mtime_ns == stamp and again.metadata == built.metadata
    assert again.folder == folder / "demo-clip" / TINY.key()


def test_zero_shot_is_above_chance_on_images_it_never_saw(tiny_demo):
    _, built = tiny_demo
    zero_shot = built.metadata["zero_shot"]
    assert zero_shot["digits_seen_classes_10way"] > 0.15  # chance: 0.1, on 300 unseen images
    assert built.metadata["trained_on"]["digits"]["held_out_classes"] == ["seven", "eight", "nine"]
    assert "DEMO backbone, not a real CLIP" in built.note and "never seven, eight, nine" in built.note


def test_bundled_demo_clip_loads_through_the_checkpoint_file_and_says_so(tiny_demo, monkeypatch, caplog):
    folder, built = tiny_demo
    monkeypatch.setenv(demo_backbone.CACHE_ENV, str(folder))
    monkeypatch.setattr(demo_backbone, "DEFAULT_RECIPE", TINY)
    with caplog.at_level(logging.WARNING, logger="fedprompt.demo_backbone"):
        backbone = load_clip_backbone(OpenCLIPBackboneConfig(model="bundled:demo-clip"), seed=0)
    assert backbone.weights.startswith("file-sha256-") and backbone.embed_dim == 32
    assert "is a DEMO backbone" in caplog.text
    config = {
        "name": "demo",
        "backbone": {"kind": "open-clip", "model": "bundled:demo-clip"},
        "prompt": {"kind": "coop", "num_tokens": 2},
        "data": {"source": "builtin", "name": "digits", "test_split": None, "max_per_class": 6},
        "partition": {"kind": "iid", "num_clients": 2, "local_val_fraction": 0.0},
        "federation": {"rounds": 1, "min_clients": 2, "local_evaluation": False},
        "runtime": {"device": "cpu", "progress": False},
    }
    result = fedprompt.run(config, write=False)
    assert result.summary["backbone"]["note"] == built.note
    assert result.summary["backbone"]["zero_shot"] == built.metadata["zero_shot"]


def test_bundled_model_config_fields():
    config = load_config(
        {
            "backbone": {"kind": "open-clip", "model": "bundled:demo-clip"},
            "prompt": {"kind": "coop"},
            "data": {"source": "builtin", "name": "digits"},
        }
    )
    assert config.backbone.pretrained == "bundled"
    assert load_config(config.model_dump(mode="json")) == config  # a resolved config reloads (resume)
    with pytest.raises(ConfigError, match="unknown bundled CLIP model 'other'"):
        load_config({"backbone": {"kind": "open-clip", "model": "bundled:other"}})
    with pytest.raises(ValidationError, match="names a bundled model's own weights"):
        OpenCLIPBackboneConfig.model_validate({"model": "ViT-B-32", "pretrained": "bundled"})


def test_demo_backbone_command_reports_the_cached_backbone(tiny_demo, monkeypatch):
    from typer.testing import CliRunner

    from fedprompt.cli import app

    folder, _ = tiny_demo
    monkeypatch.setattr(demo_backbone, "DEFAULT_RECIPE", TINY)
    count = demo_backbone.build_count
    result = CliRunner().invoke(app, ["demo-backbone", "--cache-dir", str(folder)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "is a DEMO backbone, not a real CLIP" in text and "cached:" in text
    assert demo_backbone.build_count == count
