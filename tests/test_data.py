"""Data loading (builtin corpus, local files, Hub) and client partitioning (through flwr-datasets)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Literal

import datasets
import huggingface_hub.constants
import numpy as np
import numpy.typing as npt
import pytest

from fedprompt.config import BUILTIN_DATASETS, DataConfig, PartitionConfig
from fedprompt.data.builtin import BUILTIN_LOADERS, load_chatterbot_corpus
from fedprompt.data.loading import TextClassificationData, load_text_classification
from fedprompt.data.partition import partition_by_class, partition_indices, split_local
from fedprompt.errors import DataError

SST2_DIR = Path("/work/shared/data/sst2")


def _labels(ds: datasets.Dataset) -> npt.NDArray[np.int64]:
    return np.asarray(ds["label"], dtype=np.int64)


def _label_of_text(data: TextClassificationData) -> dict[str, int]:
    return {row["text"]: row["label"] for ds in (data.train, data.test) for row in ds}


def _check_shape(data: TextClassificationData) -> None:
    for ds in (data.train, data.test):
        assert ds.column_names == ["text", "label"]
        assert isinstance(ds.features["label"], datasets.ClassLabel)
        assert ds.features["label"].names == data.label_names
        labels = _labels(ds)
        assert labels.min() >= 0 and labels.max() < data.num_classes
        assert all(isinstance(text, str) for text in ds["text"])


# --------------------------------------------------------------------------- builtin corpus


def test_builtin_names_match_config() -> None:
    assert set(BUILTIN_LOADERS) == set(BUILTIN_DATASETS)


def test_chatterbot_corpus_has_21_topics_capped_and_clean() -> None:
    corpus = load_chatterbot_corpus(seed=0)
    names = corpus.features["label"].names
    assert len(names) == 21 and "tech support" in names and names == sorted(names)
    counts = np.bincount(_labels(corpus), minlength=21)
    assert counts.max() == 150 and counts.min() >= 1
    assert len(corpus) == 1369  # measured: 1883 distinct statements, 4 topics cut to 150
    pairs = list(zip(corpus["text"], corpus["label"], strict=True))
    assert len(set(pairs)) == len(pairs)
    assert all(text and text == text.strip() for text in corpus["text"])
    uncapped = load_chatterbot_corpus(seed=0, max_per_topic=None)
    assert len(uncapped) == 1883 and np.bincount(_labels(uncapped)).max() > 150


def test_chatterbot_cap_is_seeded() -> None:
    first, again, other = (load_chatterbot_corpus(seed=s)["text"] for s in (0, 0, 1))
    assert list(first) == list(again)
    assert list(first) != list(other)


def test_builtin_source_holds_out_a_stratified_seeded_test_split() -> None:
    data = load_text_classification(DataConfig(), seed=0)
    _check_shape(data)
    assert data.num_classes == 21
    assert len(data.train) + len(data.test) == 1369
    assert len(data.test) == pytest.approx(0.2 * 1369, abs=1)
    assert set(_labels(data.test)) == set(range(21))  # stratified: even the 9-example topic is in test
    again = load_text_classification(DataConfig(), seed=0)
    assert list(again.test["text"]) == list(data.test["text"])
    other = load_text_classification(DataConfig(), seed=1)
    assert list(other.test["text"]) != list(data.test["text"])


def test_builtin_without_the_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)
    with pytest.raises(DataError, match="pip install chatterbot-corpus"):
        load_text_classification(DataConfig(), seed=0)


# --------------------------------------------------------------------------- local files


def _write_csv(path: Path, rows: list[dict[str, Any]], delimiter: str = ",") -> str:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _rows(
    n: int, labels: list[Any], text_key: str = "text", label_key: str = "label"
) -> list[dict[str, Any]]:
    return [{text_key: f"example {i}", label_key: labels[i % len(labels)], "extra": i} for i in range(n)]


def test_csv_string_labels_become_sorted_class_indices(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", _rows(30, ["pos", "neg", "neutral"]))
    test = _write_csv(tmp_path / "test.csv", _rows(9, ["neg", "pos", "neutral"]))
    data = load_text_classification(DataConfig(source="files", files={"train": train, "test": test}), seed=0)
    _check_shape(data)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert (len(data.train), len(data.test)) == (30, 9)
    assert data.train[0] == {"text": "example 0", "label": 2}  # "pos"


def test_label_names_fix_the_order_of_string_labels(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", _rows(20, ["pos", "neg"]))
    config = DataConfig(source="files", files={"train": train}, test_split=None, label_names=["pos", "neg"])
    data = load_text_classification(config, seed=0)
    assert data.label_names == ["pos", "neg"]
    labels = _label_of_text(data)
    assert all(label == int(text.split()[1]) % 2 for text, label in labels.items())  # even rows: "pos", 0


def test_unknown_string_label_is_an_error(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", _rows(10, ["pos", "neg", "meh"]))
    config = DataConfig(source="files", files={"train": train}, label_names=["pos", "neg"])
    with pytest.raises(DataError, match=r"\['meh'\].*not in data.label_names"):
        load_text_classification(config, seed=0)


def test_tsv_int_labels_keep_their_values(tmp_path: Path) -> None:
    rows = _rows(24, [2, 0, 1], text_key="sentence", label_key="y")
    rows[0]["sentence"] = 'he said "NA", then left'  # quotes survive
    rows[1]["sentence"] = "NA"  # and so does a text that pandas would read as missing
    train = _write_csv(tmp_path / "train.tsv", rows, delimiter="\t")
    config = DataConfig(
        source="files", files={"train": train}, text_column="sentence", label_column="y", test_split=None
    )
    data = load_text_classification(config, seed=0)
    _check_shape(data)
    assert data.label_names == ["0", "1", "2"]
    everything = _label_of_text(data)
    assert everything['he said "NA", then left'] == 2
    assert everything["NA"] == 0
    assert everything["example 2"] == 1

    named = load_text_classification(config.model_copy(update={"label_names": ["a", "b", "c"]}), seed=0)
    assert named.label_names == ["a", "b", "c"]
    too_few = config.model_copy(update={"label_names": ["a", "b"]})
    with pytest.raises(DataError, match=r"label 2, outside 0..1"):
        load_text_classification(too_few, seed=0)


def test_jsonl_without_test_split_holds_out_a_stratified_share(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(100, [0, 1, 2, 3]))
    config = DataConfig(source="files", files={"train": train}, test_split=None, test_fraction=0.2)
    data = load_text_classification(config, seed=3)
    _check_shape(data)
    assert (len(data.train), len(data.test)) == (80, 20)
    assert np.bincount(_labels(data.test)).tolist() == [5, 5, 5, 5]
    assert not set(data.train["text"]) & set(data.test["text"])
    same_split = load_text_classification(config.model_copy(update={"test_split": "train"}), seed=3)
    assert list(same_split.test["text"]) == list(data.test["text"])  # train is never its own test set


def test_caps_per_class_and_on_test(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(90, [0, 0, 1]))  # 60 of class 0, 30 of class 1
    test = _write_jsonl(tmp_path / "test.jsonl", _rows(40, [0, 1]))
    config = DataConfig(
        source="files", files={"train": train, "test": test}, max_per_class=20, max_test_examples=10
    )
    data = load_text_classification(config, seed=0)
    assert np.bincount(_labels(data.train)).tolist() == [20, 20]
    assert np.bincount(_labels(data.test)).tolist() == [5, 5]
    again = load_text_classification(config, seed=0)
    assert list(again.train["text"]) == list(data.train["text"])
    other = load_text_classification(config, seed=1)
    assert list(other.train["text"]) != list(data.train["text"])


def test_missing_column_error_lists_the_columns(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", _rows(10, ["a", "b"]))
    config = DataConfig(source="files", files={"train": train}, text_column="sentence")
    with pytest.raises(DataError, match=r"'sentence' is not a column.*\['text', 'label', 'extra'\]"):
        load_text_classification(config, seed=0)


def test_missing_file_error_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(DataError, match=r"nowhere\.csv"):
        load_text_classification(DataConfig(source="files", files={"train": str(missing)}), seed=0)


def test_unsupported_file_type_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("0 text\n")
    with pytest.raises(DataError, match=r"cannot read \['.txt'\] files"):
        load_text_classification(DataConfig(source="files", files={"train": str(path)}), seed=0)


# --------------------------------------------------------------------------- hub


def test_hub_offline_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    config = DataConfig(source="hub", name="fedprompt-tests/no-such-dataset")
    with pytest.raises(DataError, match=r"'fedprompt-tests/no-such-dataset'.*source: files"):
        load_text_classification(config, seed=0)


def test_hub_source_reads_a_local_dataset_folder(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train.csv", _rows(12, ["x", "y"], text_key="content", label_key="topic"))
    _write_csv(tmp_path / "test.csv", _rows(4, ["y", "x"], text_key="content", label_key="topic"))
    config = DataConfig(source="hub", name=str(tmp_path), text_column="content", label_column="topic")
    data = load_text_classification(config, seed=0)
    _check_shape(data)
    assert (len(data.train), len(data.test), data.label_names) == (12, 4, ["x", "y"])


# --------------------------------------------------------------------------- real data (optional)


@pytest.mark.skipif(
    not SST2_DIR.is_dir(), reason=f"SST-2 copy not found at {SST2_DIR} (optional shared data)"
)
def test_sst2_through_local_files(tmp_path: Path) -> None:
    files: dict[str, str | list[str]] = {}
    for split, name in (("train", "stsa.binary.train"), ("test", "stsa.binary.test")):
        rows = []
        for line in (SST2_DIR / name).read_text(encoding="utf-8").splitlines():
            label, _, sentence = line.partition(" ")
            rows.append({"sentence": sentence, "polarity": int(label)})
        files[split] = _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    config = DataConfig(
        source="files",
        files=files,
        text_column="sentence",
        label_column="polarity",
        label_names=["negative", "positive"],
        max_test_examples=500,
    )
    data = load_text_classification(config, seed=0)
    _check_shape(data)
    assert len(data.train) == 6920 and len(data.test) == 500
    assert 0.4 < _labels(data.train).mean() < 0.6
    parts = partition_indices(_labels(data.train), PartitionConfig(kind="dirichlet", alpha=0.5), seed=0)
    assert sum(len(p) for p in parts) == 6920


# --------------------------------------------------------------------------- partitions


def _balanced_labels(classes: int = 10, per_class: int = 100) -> npt.NDArray[np.int64]:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(classes), per_class))


def _assert_disjoint(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    return everything


def _max_class_share(labels: npt.NDArray[np.int64], parts: list[npt.NDArray[np.int64]]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "dirichlet_per_client"])
def test_iid_and_dirichlet_are_disjoint_complete_and_seeded(
    kind: Literal["iid", "dirichlet", "dirichlet_per_client"],
) -> None:
    labels = _balanced_labels()
    config = PartitionConfig(kind=kind, num_clients=7, alpha=0.5, min_partition_size=5)
    parts = partition_indices(labels, config, seed=0)
    assert len(parts) == 7
    assert sorted(_assert_disjoint(parts).tolist()) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 5
    same = partition_indices(labels, config, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    other = partition_indices(labels, config, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition_indices(_balanced_labels(), PartitionConfig(kind="iid", num_clients=7), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_skews_labels_far_more_than_iid() -> None:
    labels = _balanced_labels()
    iid = partition_indices(labels, PartitionConfig(kind="iid", num_clients=10), seed=0)
    skewed = partition_indices(labels, PartitionConfig(kind="dirichlet", num_clients=10, alpha=0.1), seed=0)
    iid_share, skewed_share = _max_class_share(labels, iid), _max_class_share(labels, skewed)
    assert iid_share < 0.25  # about 1/10 plus noise
    assert skewed_share > iid_share + 0.3


def test_dirichlet_per_client_splits_two_classes_among_fifty_equal_skewed_clients() -> None:
    labels = np.repeat(np.array([3, 7]), [500, 300])  # two classes, numbered apart, unequal
    per_class = PartitionConfig(kind="dirichlet", num_clients=50, alpha=0.1, min_partition_size=1)
    with pytest.raises(DataError, match=r"min_partition_size=1 examples.*or use kind: dirichlet_per_client"):
        partition_indices(labels, per_class, seed=0)

    config = PartitionConfig(kind="dirichlet_per_client", num_clients=50, alpha=0.1)
    parts = partition_indices(labels, config, seed=0)
    assert sorted(_assert_disjoint(parts).tolist()) == list(range(800))
    assert [len(p) for p in parts] == [16] * 50
    share = _max_class_share(labels, parts)
    assert share > 0.85  # most clients hold (nearly) one class
    iid = partition_indices(labels, PartitionConfig(kind="iid", num_clients=50), seed=0)
    assert share > _max_class_share(labels, iid) + 0.15

    more = np.concatenate([labels, [3, 7, 7]])
    uneven = partition_indices(more, PartitionConfig(kind="dirichlet_per_client", num_clients=50), seed=0)
    assert [len(p) for p in uneven] == [17] * 3 + [16] * 47


# datasets' sort (inside ShardPartitioner) trips a pyarrow deprecation that is none of ours
@pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")
def test_shards_give_few_labels_and_drop_exactly_the_remainder() -> None:
    labels = _balanced_labels()  # 1000 examples, 10 classes of 100
    config = PartitionConfig(kind="shards", num_clients=10, shards_per_client=2)
    parts = partition_indices(labels, config, seed=0)
    _assert_disjoint(parts)
    assert [len(p) for p in parts] == [100] * 10  # 20 shards of 50: complete here
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    same = partition_indices(labels, config, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))

    # n mod (clients * shards_per_client) examples fill no shard and are left out
    for n, clients, per_client in ((1003, 10, 2), (11, 2, 2), (50, 3, 4)):
        k = clients * per_client
        config = PartitionConfig(kind="shards", num_clients=clients, shards_per_client=per_client)
        parts = partition_indices(_balanced_labels()[:n], config, seed=5)
        kept = _assert_disjoint(parts)
        assert len(kept) == n - n % k
        assert [len(p) for p in parts] == [per_client * (n // k)] * clients


def test_partition_errors_are_clear() -> None:
    labels = _balanced_labels(classes=2, per_class=5)
    with pytest.raises(DataError, match="10 examples among 11 clients"):
        partition_indices(labels, PartitionConfig(kind="iid", num_clients=11), seed=0)
    with pytest.raises(DataError, match="lower min_partition_size"):
        partition_indices(labels, PartitionConfig(num_clients=5, min_partition_size=3), seed=0)
    with pytest.raises(DataError, match="shards need at least 12 examples"):
        partition_indices(labels, PartitionConfig(kind="shards", num_clients=4, shards_per_client=3), seed=0)


def test_dirichlet_that_never_reaches_min_size_wraps_flwr_error() -> None:
    # possible on paper (10 x 9 <= 100) but alpha=0.01 puts each class almost whole on one client
    config = PartitionConfig(kind="dirichlet", num_clients=10, alpha=0.01, min_partition_size=9)
    with pytest.raises(DataError, match=r"Lower partition.min_partition_size or raise partition.alpha"):
        partition_indices(_balanced_labels(classes=10, per_class=10), config, seed=0)


def test_partition_by_class_gives_each_client_its_classes_only() -> None:
    labels = _balanced_labels()
    parts = partition_by_class(labels, num_clients=10, classes_per_client=3, seed=0)
    assert sorted(_assert_disjoint(parts).tolist()) == list(range(len(labels)))  # every class drawn
    assert all(len(np.unique(labels[p])) == 3 for p in parts)
    same = partition_by_class(labels, num_clients=10, classes_per_client=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))

    few = partition_by_class(labels, num_clients=2, classes_per_client=2, seed=0)
    drawn = np.unique(np.concatenate([labels[p] for p in few]))
    assert len(drawn) < 10 and len(_assert_disjoint(few)) == 100 * len(drawn)  # undrawn classes left out
    with pytest.raises(DataError, match="greater than the number of unique classes"):
        partition_by_class(labels, num_clients=2, classes_per_client=11, seed=0)


def test_split_local_properties() -> None:
    indices = np.arange(0, 200, 2, dtype=np.int64)
    train, val = split_local(indices, 0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    assert sorted(np.concatenate([train, val]).tolist()) == indices.tolist()
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, _ = split_local(indices, 0.2, seed=0)
    other_train, _ = split_local(indices, 0.2, seed=1)
    assert np.array_equal(train, again_train) and not np.array_equal(train, other_train)

    train, val = split_local(indices, 0.0, seed=0)
    assert np.array_equal(train, indices) and len(val) == 0
    with pytest.raises(DataError, match="none left to train on"):
        split_local(np.array([7], dtype=np.int64), 0.5, seed=0)
    with pytest.raises(DataError, match="none left to train on"):
        split_local(np.array([], dtype=np.int64), 0.2, seed=0)
