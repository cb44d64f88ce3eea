"""Black-box configuration: the kinds it adds and the combinations it refuses, with the fields named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprompt.config import ConfigError, default_config_dict, load_config

BLACK_BOX = {
    "prompt": {"kind": "intrinsic", "dim": 500},
    "optimizer": {"kind": "cmaes", "popsize": 10, "sigma": 1.0, "budget": 640, "batch_size": 32},
    "strategy": {"kind": "fedbpt", "sigma_floor": 0.5},
}


def _load(**sections):
    return load_config({**default_config_dict(), **BLACK_BOX, **sections})


def test_black_box_sections_validate():
    cfg = _load(backbone={"kind": "remote", "url": "https://models.example:8443", "token_env": "MY_TOKEN"})
    assert cfg.prompt.kind == "intrinsic" and cfg.prompt.p0 == "none" and cfg.optimizer.chunk_size == 10
    assert cfg.strategy.rule == "cma" and cfg.backbone.retries == 3
    spsa = _load(optimizer={"kind": "spsa", "budget": 64}, strategy={"kind": "fedavg"})
    assert spsa.optimizer.lr > 0 and spsa.optimizer.epsilon > 0


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"prompt": {"kind": "soft"}},
            r"optimizer\.kind 'cmaes' searches an intrinsic prompt's z; set prompt\.kind",
        ),
        (
            {"optimizer": {"kind": "gradient"}},
            r"strategy\.kind fedbpt aggregates CMA-ES searches; set optimizer",
        ),
        (
            {"optimizer": {"kind": "spsa"}, "strategy": {"kind": "fedprox"}},
            r"strategy\.kind fedprox adds a gradient term",
        ),
        (
            {"strategy": {"kind": "fedbpt", "sigma_floor": 2.0}},
            r"strategy\.sigma_floor \(2\.0\) exceeds optimizer\.sigma \(1\.0\)",
        ),
        (
            {"optimizer": {"kind": "cmaes", "popsize": 10, "batch_size": 32, "budget": 100}},
            r"optimizer\.budget \(100 queries\) is less than one cmaes iteration: 10 candidates × batch_size",
        ),
        (
            {
                "backbone": {"kind": "remote"},
                "optimizer": {"kind": "gradient"},
                "strategy": {"kind": "fedavg"},
            },
            r"backbone\.kind remote returns outputs only, never gradients",
        ),
        ({"backbone": {"kind": "remote", "url": "ftp://x"}}, r"backbone\.remote\.url: String should match"),
        ({"backbone": {"kind": "remote", "token": "abc"}}, r"backbone\.remote\.token: is not a known field"),
        (
            {"prompt": {"kind": "intrinsic", "dim": 1}},
            r"prompt\.intrinsic\.dim: Input should be greater than",
        ),
        (
            {"strategy": {"kind": "fedbpt", "rule": "best"}},
            r"strategy\.fedbpt\.rule: Input should be 'cma' or 'mean'",
        ),
    ],
)
def test_bad_combinations_fail_naming_the_fields(sections, message):
    with pytest.raises(ConfigError, match=message):
        _load(**sections)


@pytest.mark.parametrize("name", ["fedbpt-sst2.yaml", "fedbpt-sst2-remote.yaml"])
def test_the_ready_fedbpt_configs_validate(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.strategy.kind == "fedbpt" and cfg.prompt.kind == "intrinsic" and cfg.prompt.dim == 500
    assert cfg.backbone.kind == ("remote" if "remote" in name else "hf-text")
