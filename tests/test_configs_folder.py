"""Every ready configuration under configs/ validates, and the default one is the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apps.vl_experiments.config import load_experiment
from fedprompt.config import default_config_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
APP_LOADERS = {"vl-experiments.yaml": load_experiment, "vl-domains.yaml": load_experiment}
"""Configurations of an app, which its own loader validates (run configurations otherwise)."""


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_ready_config_validates(path):
    cfg = APP_LOADERS.get(path.name, load_config)(path)
    assert cfg.name == path.stem


def test_configs_default_is_the_embedded_default():
    assert yaml.safe_load((CONFIGS / "default.yaml").read_text()) == default_config_dict()
    assert load_config(CONFIGS / "default.yaml") == load_config()
