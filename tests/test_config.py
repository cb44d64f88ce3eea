"""Configuration: defaults, overrides, and errors that name the field and what is allowed."""

from __future__ import annotations

import pytest

from fedprompt.config import ConfigError, RunConfig, apply_overrides, load_config


def test_embedded_default_is_valid_and_offline():
    cfg = load_config()
    assert cfg.backbone.model == "bundled:all-MiniLM-L6-v2"
    assert cfg.data.source == "builtin" and cfg.partition.kind == "dirichlet"


def test_overrides_parse_yaml_values_and_switch_kinds():
    cfg = load_config(
        overrides=[
            "federation.rounds=3",
            "strategy.kind=fedadam",
            "strategy.server_lr=0.1",
            "runtime.progress=false",
            "prompt.kind=deep",
            "prompt.start_layer=2",
        ]
    )
    assert cfg.federation.rounds == 3 and cfg.runtime.progress is False
    assert cfg.strategy.kind == "fedadam" and cfg.strategy.server_lr == 0.1
    assert cfg.prompt.kind == "deep" and cfg.prompt.start_layer == 2


def test_overrides_do_not_touch_the_input():
    raw = {"federation": {"rounds": 2}}
    out = apply_overrides(raw, ["federation.rounds=7", "partition.num_clients=4"])
    assert raw == {"federation": {"rounds": 2}} and out["federation"]["rounds"] == 7
    assert out["partition"] == {"num_clients": 4}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["partition.alpah=1"], r"partition\.alpah: is not a known field; allowed: kind, num_clients, alpha"),
        (
            ["strategy.kind=fedadam", "strategy.mu=1"],
            r"strategy\.fedadam\.mu: is not a known field; allowed: .*server_lr",
        ),
        (["prompt.kind=fancy"], r"prompt: Input tag 'fancy' .* expected tags: 'soft', 'deep'"),
        (
            ["federation.rounds=0"],
            r"federation\.rounds: Input should be greater than or equal to 1 \(got 0\)",
        ),
        (
            ["partition.kind=random"],
            r"partition\.kind: Input should be 'iid', 'dirichlet', 'dirichlet_per_client', 'shards', "
            r"'classes' or 'domains'",
        ),
        (["prompt.init=text"], r"init: text needs `init_text`"),
        (["federation.min_clients=20"], r"min_clients \(20\) exceeds partition\.num_clients \(10\)"),
        (["data.source=files"], r"source: files needs `files` with a 'train' entry"),
        (["data.name=imagenet"], r"builtin dataset 'imagenet' is unknown"),
        (
            ["payload.wire_dtype=int8"],
            r"payload\.wire_dtype: Input should be 'float32', 'float16' or 'bfloat16'",
        ),
        (["name=has space"], r"name: String should match pattern"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=overrides)


def test_bad_override_syntax_and_sections():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(overrides=["federation.rounds"])
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        load_config(overrides=["name.x=1"])


def test_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    good = tmp_path / "good.yaml"
    good.write_text("name: mine\nfederation: {rounds: 2}\n")
    cfg = load_config(good, ["seed=5"])
    assert (cfg.name, cfg.federation.rounds, cfg.seed) == ("mine", 2, 5)


def test_round_trip_through_a_dump():
    cfg = load_config(
        overrides=["strategy.kind=krum", "strategy.num_byzantine=1", "federation.min_clients=5"]
    )
    again = load_config(RunConfig.model_validate(cfg.model_dump(mode="json")))
    assert again == cfg
