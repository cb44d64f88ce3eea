"""apps.medvqa end to end: personalised (reliability), FedAvg and local-only VQA prompts on easy-vqa
split by shape, on a demo backbone built at a test budget, from the command line; the table's
arithmetic and its majority-answer baselines checked by hand."""

from __future__ import annotations

import csv
import re
from dataclasses import replace

import pytest
import yaml
from typer.testing import CliRunner

from apps.medvqa.__main__ import app
from apps.medvqa.methods import method_configs
from fedprompt.config import ConfigError, load_config
from fedprompt.federation.strategies.registry import build_client_rule, build_strategy
from fedprompt.tasks.clip.demo_backbone import DEFAULT_RECIPE, demo_clip

TINY_DEMO = replace(
    DEFAULT_RECIPE,
    epochs=6,
    batch_size=64,
    lr=0.002,
    warmup_steps=5,
    max_digit_images=32,
    max_shape_images=256,
    max_eval_images=32,
    model={
        **DEFAULT_RECIPE.model,
        "embed_dim": 32,
        "vision_cfg": {**DEFAULT_RECIPE.model["vision_cfg"], "layers": 1, "width": 64},
        "text_cfg": {**DEFAULT_RECIPE.model["text_cfg"], "layers": 1, "width": 64, "heads": 2},
    },
)
"""The demo backbone's recipe at a test budget: 1-layer towers, 288 images, 30 steps."""
METHOD_NAMES = ("personalised", "fedavg", "local", "majority (pooled)", "majority (own client)")
SHAPES = ("circle", "rectangle", "triangle")


def app_config(demo) -> dict:
    return {
        "name": "medvqa-test",
        "seed": 0,
        "backbone": {
            "kind": "open-clip",
            "model": str(demo.config_path),
            "pretrained": str(demo.checkpoint_path),
        },
        "prompt": {
            "kind": "vqa-twin",
            "question": {"num_tokens": 2},
            "answer": {"kind": "coop", "num_tokens": 2},
            "visual": {"kind": "vpt", "num_tokens": 2},
            "fusion_hidden": 32,
        },
        "data": {
            "source": "vqa",
            "vqa": {
                "format": "easy-vqa",
                "client_field": "shape",
                "max_train_questions": 360,
                "max_test_questions": 150,
            },
        },
        "partition": {"kind": "iid", "num_clients": 3, "local_val_fraction": 0.25},
        "federation": {"rounds": 2, "min_clients": 3, "local_evaluation": False},
        "optimizer": {"kind": "gradient", "algorithm": "adamw", "lr": 0.01, "epochs": 2, "batch_size": 16},
        "strategy": {"kind": "reliability", "alpha": 1.0},
        "runtime": {"device": "cpu", "progress": False, "eval_batch_size": 128},
    }


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medvqa")
    demo = demo_clip(TINY_DEMO, folder / "cache")
    config = folder / "medvqa.yaml"
    config.write_text(yaml.safe_dump(app_config(demo)))
    result = CliRunner().invoke(app, ["--config", str(config), "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    with (folder / "out" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    markdown = (folder / "out" / "results.md").read_text()
    return {(r["method"], r["client"]): r for r in rows}, markdown


@pytest.mark.slow
def test_every_method_and_baseline_scores_every_client(table):
    rows, markdown = table
    clients = (*SHAPES, "all clients", "mean over clients")
    assert set(rows) == {(m, c) for m in METHOD_NAMES for c in clients}
    assert "| personalised | circle |" in markdown and "## Runs" in markdown
    runs = markdown.split("## Runs")[1].split("## Accuracy")[0].strip().splitlines()
    titles = runs[0].strip("| ").split(" | ")
    seconds, sent = titles.index("time s"), titles.index("bytes up/client/round")
    for line in runs[2:]:  # seconds to one decimal place, bytes whole
        cells = line.strip("| ").split(" | ")
        assert re.fullmatch(r"\d+\.\d", cells[seconds]) and re.fullmatch(r"\d+", cells[sent]), line
    for method in METHOD_NAMES:
        per_client = [rows[method, shape] for shape in SHAPES]
        sizes = [int(r["questions"]) for r in per_client]
        assert sum(sizes) == int(rows[method, "all clients"]["questions"]) == 150
        pooled = sum(float(r["accuracy"]) * n for r, n in zip(per_client, sizes, strict=True)) / sum(sizes)
        assert float(rows[method, "all clients"]["accuracy"]) == pytest.approx(pooled, abs=1e-12)
        mean = sum(float(r["accuracy"]) for r in per_client) / 3
        assert float(rows[method, "mean over clients"]["accuracy"]) == pytest.approx(mean, abs=1e-12)


@pytest.mark.slow
def test_majority_baselines_by_hand(table):
    rows, _ = table
    # a client holds one shape: its own shape questions all have its shape for answer
    assert all(rows["majority (own client)", shape]["type: shape"] == "1.0" for shape in SHAPES)
    # the pooled majority shape is one shape: right on its client's shape questions only
    pooled = sorted(rows["majority (pooled)", shape]["type: shape"] for shape in SHAPES)
    assert pooled == ["0.0", "0.0", "1.0"]
    # yes/no questions are the closed ones
    for method in METHOD_NAMES:
        assert rows[method, "all clients"]["closed"] == rows[method, "all clients"]["type: yes/no"]


@pytest.mark.slow
def test_personal_prompts_learn_their_clients_shape(table):
    rows, _ = table
    pooled_baseline = float(rows["majority (pooled)", "mean over clients"]["type: shape"])
    for method in ("personalised", "local"):
        assert float(rows[method, "mean over clients"]["type: shape"]) > pooled_baseline + 0.3


def test_the_app_refuses_configs_it_cannot_report():
    base = {
        "backbone": {"kind": "open-clip", "model": "ViT-B-32", "pretrained": None},
        "prompt": {"kind": "vqa-twin"},
        "data": {"source": "vqa", "vqa": {"format": "easy-vqa", "client_field": "shape"}},
        "partition": {"num_clients": 3, "local_val_fraction": 0.2},
        "strategy": {"kind": "reliability"},
    }
    configs = method_configs(load_config(base), ["personalised", "fedavg", "local"])
    assert [c.strategy.kind for c in configs.values()] == ["reliability", "fedavg", "reliability"]
    assert configs["local"].strategy.alpha == 0 and configs["personalised"].strategy.alpha == 1.0
    for config in configs.values():  # the same data, partition, seed and prompt
        same = config.model_dump(exclude={"name", "strategy"})
        assert same == configs["fedavg"].model_dump(exclude={"name", "strategy"})
    local_head = method_configs(
        load_config({**base, "personalization": {"local": ["fusion.*"]}}), ["personalised", "fedavg", "local"]
    )
    assert [c.personalization.local for c in local_head.values()] == [["fusion.*"], [], ["fusion.*"]]
    with pytest.raises(ConfigError, match=r"personalization\.shared_tokens"):
        method_configs(load_config(base, ["personalization.shared_tokens=1"]), ["fedavg"])
    no_field = {**base, "data": {"source": "vqa", "vqa": {"format": "easy-vqa"}}}
    with pytest.raises(ConfigError, match=r"data\.vqa\.client_field"):
        method_configs(load_config(no_field), ["fedavg"])
    with pytest.raises(ConfigError, match=r"strategy\.kind: .*reliability"):
        method_configs(load_config({**base, "strategy": {"kind": "fedavg"}}), ["fedavg"])
    with pytest.raises(ConfigError, match=r"methods: \['fedprox'\]"):
        method_configs(load_config(base), ["fedprox"])


def test_a_head_pull_is_wired_from_the_config_and_refused_where_no_head_travels():
    base = {
        "backbone": {"kind": "open-clip", "model": "ViT-B-32", "pretrained": None},
        "prompt": {"kind": "vqa-twin"},
        "data": {"source": "vqa", "vqa": {"format": "easy-vqa", "client_field": "shape"}},
        "partition": {"num_clients": 3, "local_val_fraction": 0.2},
        "strategy": {"kind": "reliability", "alpha": 0.1, "head_alpha": 3.0},
    }
    config = load_config(base)
    prompts = {"question.context", "answer.context", "image.prompts"}
    assert build_strategy(config.strategy, prompt_tensors=prompts).pulls_head
    rule = build_client_rule(config.strategy, prompt_tensors=prompts)
    assert (rule.alpha, rule.head_alpha) == (0.1, 3.0)
    assert not build_strategy(load_config(base, ["strategy.head_alpha=0"]).strategy).pulls_head
    # the app's local-only baseline pulls nothing, head included
    assert method_configs(config, ["local"])["local"].strategy.head_alpha == 0
    with pytest.raises(ConfigError, match=r"personalization\.local \['fusion\.\*'\] keeps it on each client"):
        load_config({**base, "personalization": {"local": ["fusion.*"]}})
    text = {
        "strategy": {"kind": "reliability", "head_alpha": 1.0},
        "partition": {"local_val_fraction": 0.2},
    }
    with pytest.raises(ConfigError, match=r"strategy\.head_alpha .* prompt\.kind 'soft' has none"):
        load_config(text)
