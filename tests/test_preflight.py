"""Layer-dependent config fields fail before any model loads, from the model's configuration alone."""

from __future__ import annotations

import pytest
from clip_support import write_tiny_clip_config

from fedprompt.config import ConfigError, load_config
from fedprompt.tasks.preflight import check_model_fields
from fedprompt.tasks.registry import build_experiment
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.hf_text import HFTextBackbone

from conftest import TINY_GPT2


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error")

    monkeypatch.setattr(HFTextBackbone, "load", refuse)
    monkeypatch.setattr(OpenCLIPBackbone, "load", refuse)


def test_deep_prompt_start_layer_is_checked_against_the_bundled_minilm(no_model_loads):
    config = load_config(None, ["prompt.kind=deep", "prompt.start_layer=6"])
    with pytest.raises(
        ConfigError, match=r"prompt\.start_layer: 6 is past the last layer; the model has 6 layers"
    ):
        build_experiment(config)
    check_model_fields(load_config(None, ["prompt.kind=deep", "prompt.start_layer=5"]))  # the last layer


def test_deep_prompt_start_layer_on_a_random_gpt2_config(no_model_loads):
    config = load_config(
        {
            "backbone": {"model": "random", "random_config": TINY_GPT2},
            "head": {"kind": "verbalizer", "template": "{text} It was", "label_words": {"a": [" good"]}},
            "prompt": {"kind": "deep", "start_layer": 2},
        }
    )
    with pytest.raises(ConfigError, match="the model has 2 layers"):  # GPT-2 calls them n_layer
        check_model_fields(config)


def _clip(tmp_path, prompt: dict) -> dict:
    return {
        "backbone": {"kind": "open-clip", "model": str(write_tiny_clip_config(tmp_path)), "pretrained": None},
        "prompt": prompt,
        "data": {"source": "builtin", "name": "digits", "test_split": None},
    }


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (
            {"kind": "vpt", "start_layer": 2},
            r"prompt\.start_layer: 2 is past the last vision layer \(0\.\.1\)",
        ),
        (
            {"kind": "vpt", "deep": True, "depth": 3},
            r"prompt\.depth: 3 layers from 0 pass the tower's 2 layers",
        ),
        (
            {
                "kind": "twin",
                "text": {"depth": 1, "num_tokens": 2},
                "visual": {"kind": "vpt", "deep": True, "num_tokens": 2},
                "coupled": True,
            },
            r"raise prompt\.text\.depth to 2",
        ),
    ],
    ids=["vpt-start", "vpt-depth", "coupled-depth"],
)
def test_visual_prompt_layers_are_checked_against_the_open_clip_config(
    tmp_path, no_model_loads, prompt, message
):
    with pytest.raises(ConfigError, match=message):
        build_experiment(load_config(_clip(tmp_path, prompt)))


def test_a_model_whose_config_cannot_be_read_here_is_left_to_the_loader(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(
        None, ["prompt.kind=deep", "prompt.start_layer=60", "backbone.model=no-such-org/no-model"]
    )
    check_model_fields(config)  # no error here: the loader says what is missing
