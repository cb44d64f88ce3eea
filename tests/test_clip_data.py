"""Image data, base-to-novel split, class partitions, the feature cache, CLIP configs and their errors."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedprompt.config import (
    BUILTIN_IMAGE_DATASETS,
    MULTI_DOMAIN_BUILTINS,
    ConfigError,
    DataConfig,
    PartitionConfig,
    load_config,
)
from fedprompt.data.images import (
    DIGIT_NAMES,
    IMAGE_BUILTINS,
    load_digits,
    load_image_classification,
    split_base_novel,
)
from fedprompt.data.partition import partition_indices
from fedprompt.errors import DataError
from fedprompt.tasks.clip.feature_cache import FeatureCache, image_fingerprint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLIP_BASE = {
    "backbone": {"kind": "open-clip", "model": "ViT-B-32", "pretrained": "openai"},
    "prompt": {"kind": "coop"},
    "data": {"source": "builtin", "name": "digits", "test_split": None},
}


def test_builtin_image_names_match_config():
    assert set(IMAGE_BUILTINS) | set(MULTI_DOMAIN_BUILTINS) == set(BUILTIN_IMAGE_DATASETS)


def test_digits_builtin_is_read_through_datasets():
    data = load_image_classification(DataConfig(source="builtin", name="digits", test_split=None), seed=0)
    assert data.label_names == list(DIGIT_NAMES)
    assert len(data.train) + len(data.test) == 1797 and data.train.column_names == ["image", "label"]
    image = data.train[0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    assert np.asarray(image).max() > 200  # 0..16 scaled to 0..255
    assert sorted(set(data.test["label"])) == list(range(10))  # stratified hold-out


def test_image_folder_source_and_column_errors(tiny_clip):
    config = DataConfig(source="image-folder", name=str(tiny_clip.generated))
    data = load_image_classification(config, seed=0)
    assert data.label_names == ["blue", "green", "red", "yellow"]
    assert (len(data.train), len(data.test)) == (160, 80)
    with pytest.raises(DataError, match=r"data.image_column 'img' is not a column of split 'train'"):
        load_image_classification(config.model_copy(update={"image_column": "img"}), seed=0)
    with pytest.raises(DataError, match="is not a folder"):
        load_image_classification(DataConfig(source="image-folder", name="/no/such/folder"), seed=0)


def test_a_column_without_images_is_refused(tmp_path):
    datasets.Dataset.from_dict({"pic": [1, 2, 3], "label": [0, 1, 0]}).to_parquet(tmp_path / "train.parquet")
    config = DataConfig(source="hub", name=str(tmp_path), image_column="pic", test_split=None)
    with pytest.raises(DataError, match=r"data.image_column 'pic' of split 'train' holds .*, not images"):
        load_image_classification(config, seed=0)


def test_hub_source_offline_error_says_how_to_go_local():
    with pytest.raises(
        DataError, match=r"(?s)could not load the dataset 'fedprompt-test/absent'.*image-folder"
    ):
        load_image_classification(DataConfig(source="hub", name="fedprompt-test/absent"), seed=0)


def test_base_to_novel_split_keeps_novel_classes_out_of_training():
    data = load_image_classification(DataConfig(source="builtin", name="digits", test_split=None), seed=0)
    split = split_base_novel(data, 0.5)
    assert split.base_names == list(DIGIT_NAMES[:5]) and split.novel_names == list(DIGIT_NAMES[5:])
    assert set(split.train["label"]) == set(range(5)) and set(split.base_test["label"]) == set(range(5))
    assert set(split.novel_test["label"]) == set(range(5))  # renumbered 0..4 for "five".."nine"
    novel_rows = np.flatnonzero(np.array(data.test["label"]) >= 5)
    assert [data.test["label"][i] - 5 for i in novel_rows] == split.novel_test["label"]
    assert split.novel_test.features["label"].names == list(DIGIT_NAMES[5:])
    with pytest.raises(DataError, match="leaves 10 base and 0 novel classes"):
        split_base_novel(data, 0.05)


def test_classes_partition_gives_each_client_its_classes():
    labels = np.repeat(np.arange(6), 20)
    config = PartitionConfig(kind="classes", num_clients=6, classes_per_client=2)
    parts = partition_indices(labels, config, seed=0)
    assert len(parts) == 6
    assert all(len(set(labels[p])) <= 2 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(120))  # 6 clients cover the 6 classes
    with pytest.raises(DataError, match="cannot give 3 clients 7 classes each"):
        partition_indices(labels, PartitionConfig(kind="classes", num_clients=3, classes_per_client=7), 0)


def test_feature_cache_writes_safetensors_and_reads_them_back(tmp_path):
    parts = {"model": "m", "weights": "w", "input": "image_features", "images": "abc"}
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)

    first = FeatureCache(tmp_path).get(parts, compute)
    again = FeatureCache(tmp_path).get(parts, compute)  # a new process: read from the file
    assert len(calls) == 1 and torch.equal(first, again)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and torch.equal(load_file(str(files[0]))["values"], first)
    FeatureCache(tmp_path).get({**parts, "images": "other"}, compute)
    assert len(calls) == 2  # other data, another key
    files[0].write_bytes(b"not safetensors")
    assert torch.equal(FeatureCache(tmp_path).get(parts, compute), first) and len(calls) == 3  # recomputed
    memory = FeatureCache()
    memory.get(parts, compute)
    memory.get(parts, compute)
    assert len(calls) == 4 and memory.hits == 1
    FeatureCache(tmp_path / "pixels").get(parts, compute, persist=False)
    assert not (tmp_path / "pixels").exists()


def test_image_fingerprint_follows_the_image_bytes():
    digits = load_digits(0)
    a, b = digits.select(range(10)), digits.select(range(1, 11))
    assert image_fingerprint(a) == image_fingerprint(digits.select(range(10)))
    assert image_fingerprint(a) != image_fingerprint(b)


def test_clip_configs_name_real_pretrained_tags():
    import open_clip

    for name in ("promptfl", "vpt", "tpfl", "fedtpg"):
        config = load_config(CONFIGS / f"{name}.yaml")
        assert config.backbone.kind == "open-clip"
        assert config.backbone.pretrained in open_clip.list_pretrained_tags_by_model(config.backbone.model)


def _with(**sections) -> dict:
    raw = copy.deepcopy(CLIP_BASE)
    raw.update(sections)
    return raw


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"prompt": {"kind": "soft"}},
            r"prompt.kind 'soft' is for text backbones; .* one of \['coop', 'vpt'",
        ),
        ({"backbone": {"kind": "hf-text"}}, r"prompt.kind 'coop' needs backbone.kind: open-clip"),
        ({"head": {"kind": "verbalizer"}}, r"head: applies to text backbones only"),
        ({"data": {"name": "chatterbot-corpus"}}, r"data: backbone.kind open-clip needs images"),
        (
            {"prompt": {"kind": "twin", "coupled": True}},
            r"prompt.twin: coupled: true needs visual.kind: vpt",
        ),
        (
            {"prompt": {"kind": "twin", "coupled": True, "visual": {"kind": "vpt", "num_tokens": 3}}},
            r"visual.num_tokens \(3\) must equal text.num_tokens \(16\)",
        ),
        ({"prompt": {"kind": "vpt", "depth": 3}}, r"prompt.vpt: depth applies to deep VPT only"),
        ({"prompt": {"kind": "pixel", "method": "ring"}}, r"prompt.pixel.method: Input should be 'patch'"),
        ({"prompt": {"kind": "coop", "init": "text"}}, r"init: text needs `init_text`"),
        (
            {"prompt": {"kind": "twin", "visual_optimizer": {"lr": -1}}},
            r"visual_optimizer.lr: Input should be",
        ),
        (
            {"backbone": {"kind": "open-clip", "precision": "fp8"}},
            r"backbone.open-clip.precision: Input should",
        ),
        ({"data": {"source": "image-folder", "name": None}}, r"image-folder needs `name`"),
        (
            {"data": {"name": "digits", "novel_class_fraction": 1.5}},
            r"novel_class_fraction: Input should be less",
        ),
        ({"partition": {"kind": "classes", "classes_per_client": 0}}, r"classes_per_client: Input should be"),
    ],
)
def test_clip_config_errors_name_the_field(sections, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(_with(**sections))


def test_text_runs_reject_image_parts():
    with pytest.raises(ConfigError, match=r"data: image datasets need backbone\.kind: open-clip"):
        load_config(overrides=["data.name=digits"])
    with pytest.raises(ConfigError, match=r"novel_class_fraction .* needs backbone\.kind: open-clip"):
        load_config(overrides=["data.novel_class_fraction=0.5"])
