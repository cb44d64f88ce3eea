"""Every CLIP prompt module learns in a federated run, on generated images and on scikit-learn's digits;
base-to-novel evaluation; the on-disk feature cache; bytes on the wire."""

from __future__ import annotations

import math

import pytest
import torch
from clip_support import clip_run_config

from fedprompt.api import run

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = {
    "coop": {"kind": "coop", "num_tokens": 4},
    "vpt": {"kind": "vpt", "num_tokens": 4, "deep": True},
    "pixel": {"kind": "pixel", "method": "frame", "size": 4},
    "tpfl": {
        "kind": "twin",
        "text": {"num_tokens": 4},
        "visual": {"kind": "pixel", "size": 8},
        "visual_optimizer": {"lr": 0.05},
    },
    "atpfl": {
        "kind": "twin",
        "text": {"num_tokens": 4},
        "visual": {"kind": "pixel", "size": 8},
        "visual_optimizer": {"lr": 0.05},
        "contrastive": True,
    },
    "twin-tokens": {"kind": "twin", "text": {"num_tokens": 4}, "visual": {"kind": "vpt", "num_tokens": 4}},
    "twin-coupled": {
        "kind": "twin",
        "text": {"num_tokens": 2, "depth": 2},
        "visual": {"kind": "vpt", "num_tokens": 2, "deep": True},
        "coupled": True,
    },
    "generator": {"kind": "generator", "num_tokens": 4, "heads": 2},
}
LEARNING_RATES = {"pixel": 0.05}
BARE_NAMES = {"class_template": "{}"}
"""The tiny CLIP was aligned to the bare class names: on the digits, the image-side-only prompts score
against those (with "a photo of a {}." they start near chance and 3 short rounds teach them little)."""
DIGITS = {
    "source": "builtin",
    "name": "digits",
    "test_split": None,
    "max_per_class": 30,
    "max_test_examples": 200,
}
# (chance, the least final accuracy, the least gain over the initial prompt)
BARS = {"generated": (0.25, 0.65, 0.2), "digits": (0.10, 0.30, 0.1)}


def _data(dataset: str, tiny_clip) -> dict:
    return DIGITS if dataset == "digits" else {"source": "image-folder", "name": str(tiny_clip.generated)}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["generated", "digits"])
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_each_module_learns_well_above_chance(tiny_clip, kind, dataset):
    prompt = {**PROMPTS[kind], **(BARE_NAMES if dataset == "digits" and kind in ("vpt", "pixel") else {})}
    config = clip_run_config(
        tiny_clip, prompt, _data(dataset, tiny_clip), optimizer={"lr": LEARNING_RATES.get(kind, 0.02)}
    )
    result = run(config, write=False)
    chance, least, gain = BARS[dataset]
    first, last = result.summary["initial_accuracy"], result.summary["final_accuracy"]
    assert last >= least and last >= first + gain, (kind, dataset, first, last, chance)
    assert result.summary["bytes_up_over_backbone"] < 0.05  # the prompt, never the model


@pytest.mark.slow
def test_base_to_novel_generator_reports_base_novel_and_harmonic_mean(tiny_clip):
    """FedTPG's setting: two datasets pooled (digits: 5 base and 5 novel classes; the generated
    colours: 2 and 2), three clients each holding base classes of one dataset and scoring only those,
    SGD as the reference trains, uniform averaging. base_accuracy is the mean of the two datasets'
    (chance 0.35). Over seeds 0-5 the final one was 0.51-0.68, and 0.125-0.32 above the initial
    prompt's; the bars below leave room for a changed numerical stack, not for a generator that
    does not learn.

    (The earlier version of this test trained one shared class set with AdamW at lr 0.005 and read
    100 test images after 3 rounds: its base accuracy swung by 0.1-0.2 from round to round, and its
    final value spread over 0.38-0.76 across seeds, so any numerical change could cross its 0.45.)
    """
    digits = {**DIGITS, "max_per_class": 16, "max_test_examples": None}
    colours = {"source": "image-folder", "name": str(tiny_clip.generated), "max_per_class": 16}
    config = clip_run_config(
        tiny_clip,
        PROMPTS["generator"],
        {"source": "datasets", "datasets": [digits, colours], "novel_class_fraction": 0.5},
        partition={"kind": "classes", "num_clients": 3, "classes_per_client": 2},
        federation={"rounds": 4, "min_clients": 3},
        optimizer={"algorithm": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 2, "batch_size": 8},
        strategy={"kind": "fedavg", "weighting": "uniform"},
    )
    result = run(config, write=False)
    rows = [r for r in result.history if "novel_accuracy" in r]
    assert len(rows) == 5  # round 0 and every round after
    for row in rows:
        for part in ("base", "novel"):
            per_dataset = (row[f"digits_{part}_accuracy"], row[f"generated_{part}_accuracy"])
            assert row[f"{part}_accuracy"] == pytest.approx(sum(per_dataset) / 2)
        base, novel = row["base_accuracy"], row["novel_accuracy"]
        assert row["harmonic_mean"] == pytest.approx(2 * base * novel / (base + novel))
        assert 0 <= novel <= 1 and math.isfinite(novel)
    assert rows[-1]["base_accuracy"] >= 0.45
    assert rows[-1]["base_accuracy"] >= rows[0]["base_accuracy"] + 0.08
    assert result.summary["final_harmonic_mean"] == rows[-1]["harmonic_mean"]
    assert result.summary["final_novel_accuracy"] == rows[-1]["novel_accuracy"]


@pytest.mark.slow
def test_disk_feature_cache_is_written_once_and_reused(tiny_clip, tmp_path):
    cache = tmp_path / "features"
    config = clip_run_config(
        tiny_clip,
        PROMPTS["coop"],
        _data("generated", tiny_clip),
        backbone={"feature_cache_dir": str(cache)},
        partition={"kind": "classes", "num_clients": 4, "classes_per_client": 2},
        federation={"rounds": 1},
    )
    first = run(config, write=False)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2  # the train and the test features
    stamps = [f.stat().st_mtime_ns for f in files]
    second = run(config, write=False)
    assert [
        f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))
    ] == stamps  # read, not rewritten
    assert second.history[-1]["global_accuracy"] == first.history[-1]["global_accuracy"]


def test_a_process_hosting_some_clients_encodes_only_their_images(tiny_clip):
    from fedprompt.config import load_config
    from fedprompt.tasks.registry import build_experiment

    config = load_config(clip_run_config(tiny_clip, PROMPTS["coop"], _data("generated", tiny_clip)))
    everyone = build_experiment(config)
    one = build_experiment(config, client_ids={1})
    assert list(one.clients) == [1] and list(everyone.clients) == [0, 1, 2]
    mine, reference = one.clients[1].train_data.tensors, everyone.clients[1].train_data.tensors
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)
