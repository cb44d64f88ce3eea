"""Builtin datasets name their own columns: a config's column fields never break them."""

from __future__ import annotations

import logging
from pathlib import Path

from fedprompt.config import DataConfig, load_config
from fedprompt.data.images import load_image_classification
from fedprompt.data.loading import load_text_classification

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_cifar_config_pointed_at_the_builtin_digits_loads_them(caplog):
    config = load_config(
        CONFIGS / "promptfl.yaml", ["data.source=builtin", "data.name=digits", "data.test_split=null"]
    )
    assert config.data.image_column == "img"  # kept from the CIFAR config
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.loading"):
        data = load_image_classification(config.data, seed=0)
    assert data.train.column_names == ["image", "label"] and len(data.label_names) == 10
    assert "builtin dataset 'digits' has its own columns" in caplog.text
    assert "data.image_column='img'" in caplog.text


def test_every_overridden_column_of_a_builtin_is_named_and_ignored(caplog):
    config = DataConfig(source="builtin", name="digits", image_column="img", label_column="target")
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.loading"):
        data = load_image_classification(config.model_copy(update={"test_split": None}), seed=0)
    assert len(data.train) + len(data.test) == 1797
    assert "data.image_column='img', data.label_column='target'" in caplog.text


def test_builtin_text_corpus_ignores_a_text_column_override(caplog):
    config = DataConfig(source="builtin", name="chatterbot-corpus", text_column="sentence", test_split=None)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.loading"):
        data = load_text_classification(config, seed=0)
    assert data.train.column_names == ["text", "label"]
    assert "data.text_column='sentence'" in caplog.text


def test_matching_columns_give_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.loading"):
        load_image_classification(DataConfig(source="builtin", name="digits", test_split=None), seed=0)
    assert "own columns" not in caplog.text
