"""Labelled text for classification, from the builtin corpus, the Hugging Face Hub or local files.

Every source ends in the same shape (`TextClassificationData`): a train and a test
``datasets.Dataset`` with exactly the columns ``text`` (str) and ``label`` (a ClassLabel: ints
0..C-1), and the class names. Every random choice (held-out test split, per-class caps) is seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from fedprompt.config import DataConfig
from fedprompt.data.builtin import BUILTIN_COLUMNS, load_builtin
from fedprompt.errors import DataError

logger = logging.getLogger("fedprompt.data.loading")

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TextClassificationData:
    """A text classification task: owns its train and test splits and its class names.

    Both splits have exactly the columns ``text`` (str) and ``label`` (a ``ClassLabel`` whose ints
    run over 0..len(label_names)-1, in `label_names` order).
    """

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes, C."""
        return len(self.label_names)


def load_text_classification(config: DataConfig, seed: int) -> TextClassificationData:
    """Load the configured data, standardise it to ``text``/``label`` and split off a test set if needed.

    Labels that are strings become class indices (sorted names, or `config.label_names` order);
    integer labels keep their values. Without a test split (`test_split` None, absent from the data,
    or the train split itself) a seeded stratified `test_fraction` of train becomes the test set.
    Then `max_per_class` caps train per class and `max_test_examples` caps test, both seeded.
    A builtin dataset's own columns replace the config's column fields (``with_builtin_columns``).
    Raises DataError.
    """
    config = with_builtin_columns(config, BUILTIN_COLUMNS)
    train, test, label_names = prepare_splits(_load_splits(config, seed), config, seed, _select_columns)
    return TextClassificationData(train=train, test=test, label_names=label_names)


def with_builtin_columns(config: DataConfig, columns: dict[str, dict[str, str]]) -> DataConfig:
    """A builtin dataset names its own columns: for ``source: builtin`` the config's column fields
    are set to the builtin's (``columns``: builtin name -> {field: column}); a different value the
    user gave (e.g. ``image_column: img`` kept from a CIFAR config) is ignored with a warning."""
    if config.source != "builtin" or config.name not in columns:
        return config
    own = columns[config.name]
    ignored = {name: getattr(config, name) for name, column in own.items() if getattr(config, name) != column}
    if ignored:
        logger.warning(
            "builtin dataset %r has its own columns %s; ignoring %s",
            config.name,
            own,
            ", ".join(f"data.{name}={value!r}" for name, value in ignored.items()),
        )
    return config.model_copy(update=own)


def prepare_splits(
    splits: dict[str, datasets.Dataset],
    config: DataConfig,
    seed: int,
    select_columns: Callable[[datasets.Dataset, str, DataConfig], datasets.Dataset],
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """(train, test, label names) from loaded splits, for text and images alike.

    ``select_columns`` standardises a split's columns (``text`` or ``image``, and ``label``); then
    labels are encoded, a test set is held out when there is none, and the caps are applied.
    """
    if config.train_split not in splits:
        raise DataError(
            f"data.train_split {config.train_split!r} is not in the data; its splits are {sorted(splits)}"
        )
    wanted = {config.train_split: splits[config.train_split]}
    test_split = config.test_split if config.test_split != config.train_split else None
    if test_split is not None and test_split in splits:
        wanted[test_split] = splits[test_split]
    elif config.test_split is not None:
        logger.info(
            "no %r split: holding out %.0f%% of train as test", config.test_split, 100 * config.test_fraction
        )
    label_names, encoded = _encode_labels(
        {split: select_columns(ds, split, config) for split, ds in wanted.items()}, config
    )
    train = encoded[config.train_split]
    if len(train) == 0:
        raise DataError(f"split {config.train_split!r} has no examples")
    if test_split is not None and test_split in encoded:
        test = encoded[test_split]
    else:
        train, test = _split_off(
            train, config.test_fraction, seed, f"a {config.test_fraction} test share off train"
        )
    if config.max_per_class is not None:
        train = _cap_per_class(train, config.max_per_class, seed)
    if config.max_test_examples is not None and len(test) > config.max_test_examples:
        _, test = _split_off(
            test, config.max_test_examples, seed, f"{config.max_test_examples} test examples"
        )
    return train, test, label_names


# --------------------------------------------------------------------------- sources


def _load_splits(config: DataConfig, seed: int) -> dict[str, datasets.Dataset]:
    if config.source == "builtin":
        assert config.name is not None  # DataConfig guarantees a builtin name
        try:
            return {"train": load_builtin(config.name, seed)}
        except ImportError as exc:
            raise DataError(str(exc)) from exc
    if config.source == "hub":
        assert config.name is not None  # DataConfig guarantees a name for source: hub
        return _load_hub(config.name, config.subset)
    assert config.files is not None  # DataConfig guarantees files for source: files
    needed = [s for s in (config.train_split, config.test_split) if s is not None and s in config.files]
    return {split: _load_files(split, config.files[split]) for split in needed}


def _load_hub(name: str, subset: str | None) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(name, subset)
    except Exception as exc:
        raise DataError(
            f"could not load dataset {name!r}" + (f" (subset {subset!r})" if subset else "") + f": {exc}. "
            "Without network access, pass local files instead (data.source: files, "
            "data.files: {train: train.csv, test: test.csv}) or point data.name at a local dataset "
            "folder, or load it once online so the Hugging Face cache holds it (then HF_HUB_OFFLINE=1 "
            "reads the cache)."
        ) from exc
    return dict(loaded)


def _load_files(split: str, files: str | list[str]) -> datasets.Dataset:
    paths = [Path(f).expanduser() for f in ([files] if isinstance(files, str) else files)]
    if not paths:
        raise DataError(f"data.files.{split} lists no files")
    for path in paths:
        if not path.is_file():
            raise DataError(f"data.files.{split}: file {str(path)!r} does not exist")
    suffixes = {path.suffix.lower() for path in paths}
    unknown = suffixes - set(_FILE_BUILDERS)
    if unknown:
        raise DataError(
            f"data.files.{split}: cannot read {sorted(unknown)} files; use one of {sorted(_FILE_BUILDERS)}"
        )
    if len(suffixes) > 1:
        raise DataError(f"data.files.{split} mixes file types {sorted(suffixes)}; use one type per split")
    suffix = suffixes.pop()
    builder = _FILE_BUILDERS[suffix]
    # csv: keep texts such as "NA" or "null" as written instead of turning them into missing values
    options: dict[str, object] = {"keep_default_na": False} if builder == "csv" else {}
    if suffix == ".tsv":
        options["delimiter"] = "\t"
    try:
        return datasets.load_dataset(
            builder, data_files={split: [str(p) for p in paths]}, split=split, **options
        )
    except Exception as exc:
        raise DataError(f"could not read data.files.{split} {[str(p) for p in paths]}: {exc}") from exc


# --------------------------------------------------------------------------- standardising


def _select_columns(ds: datasets.Dataset, split: str, config: DataConfig) -> datasets.Dataset:
    """Keep the text and label columns only, renamed to ``text`` and ``label``."""
    if config.text_column == config.label_column:
        raise DataError(f"data.text_column and data.label_column are both {config.text_column!r}")
    for field, column in (("text_column", config.text_column), ("label_column", config.label_column)):
        if column not in ds.column_names:
            raise DataError(
                f"data.{field} {column!r} is not a column of split {split!r}; "
                f"its columns are {ds.column_names}"
            )
    ds = ds.select_columns([config.text_column, config.label_column])
    renames = {config.text_column: "text", config.label_column: "label"}
    ds = ds.rename_columns({old: new for old, new in renames.items() if old != new})
    text = ds.with_format("arrow")["text"]
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise DataError(f"split {split!r}: text column {config.text_column!r} holds {text.type}, not strings")
    if text.null_count:
        raise DataError(f"split {split!r}: {text.null_count} examples have no text in {config.text_column!r}")
    return ds


def _encode_labels(
    splits: dict[str, datasets.Dataset], config: DataConfig
) -> tuple[list[str], dict[str, datasets.Dataset]]:
    """Turn every split's ``label`` into class indices; return the class names and the encoded splits."""
    raw = {split: _raw_labels(ds, split) for split, ds in splits.items()}
    kinds = {split: values.dtype.kind for split, values in raw.items()}
    if "U" in kinds.values() and len(set(kinds.values())) > 1:
        raise DataError(
            f"label column {config.label_column!r} holds strings in some splits, numbers in others"
        )
    first = next(iter(splits.values())).features["label"]
    if config.label_names is not None:
        names = list(config.label_names)
        if len(set(names)) != len(names):
            raise DataError(f"data.label_names has repeated names: {names}")
    elif isinstance(first, datasets.ClassLabel):
        names = list(first.names)
    elif "U" in kinds.values():
        names = sorted(set().union(*(np.unique(values).tolist() for values in raw.values())))
    else:
        highest = max((int(values.max()) for values in raw.values() if len(values)), default=-1)
        names = [str(i) for i in range(highest + 1)]
    index = {name: i for i, name in enumerate(names)}
    feature = datasets.ClassLabel(names=names)
    encoded = {}
    for split, values in raw.items():
        if values.dtype.kind == "U":
            unknown = sorted(set(np.unique(values).tolist()) - index.keys())
            if unknown:
                raise DataError(
                    f"split {split!r} has labels {unknown[:5]} that are not in data.label_names {names}"
                )
            codes = np.array([index[v] for v in values.tolist()], dtype=np.int64)
        else:
            codes = values.astype(np.int64)
        bad = codes[(codes < 0) | (codes >= len(names))]
        if len(bad):
            raise DataError(
                f"split {split!r} has label {int(bad[0])}, outside 0..{len(names) - 1} "
                f"({len(names)} classes); fix data.label_names, or use test_split: null if this split "
                "is unlabelled (-1)"
            )
        ds = splits[split].remove_columns("label")
        encoded[split] = ds.add_column("label", codes, feature=feature)
    return names, encoded


def _raw_labels(ds: datasets.Dataset, split: str) -> npt.NDArray[np.int64] | npt.NDArray[np.str_]:
    """A split's labels as int64 or str values, checked for missing or empty ones."""
    column = ds.with_format("arrow")["label"]
    if column.null_count:
        raise DataError(f"split {split!r}: {column.null_count} examples have no label")
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return np.asarray(column.to_numpy(), dtype=np.int64)
    if pa.types.is_floating(kind):
        floats = np.asarray(column.to_numpy(), dtype=np.float64)
        if not np.array_equal(floats, np.round(floats)):
            raise DataError(
                f"split {split!r}: labels must be integers or strings, found {floats[floats % 1 != 0][0]}"
            )
        return floats.astype(np.int64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        strings = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.str_)
        if np.any(strings == ""):
            raise DataError(f"split {split!r}: {int(np.sum(strings == ''))} examples have an empty label")
        return strings
    raise DataError(f"split {split!r}: labels must be integers or strings, not {kind}")


# --------------------------------------------------------------------------- seeded splits and caps


def _split_off(
    ds: datasets.Dataset, size: float | int, seed: int, what: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split `size` examples (a share or a count) off `ds`, stratified by label where possible.

    Returns (rest, split off).
    """
    try:
        parts = ds.train_test_split(test_size=size, stratify_by_column="label", seed=seed)
    except ValueError:  # a class with one example, or fewer test examples than classes: split unstratified
        try:
            parts = ds.train_test_split(test_size=size, seed=seed)
        except ValueError as exc:
            raise DataError(f"cannot split {what} of {len(ds)} examples: {exc}") from exc
    return parts["train"], parts["test"]


def _cap_per_class(ds: datasets.Dataset, cap: int, seed: int) -> datasets.Dataset:
    """Keep at most `cap` examples of each class (a seeded choice), in their original order."""
    labels = np.asarray(ds.with_format("arrow")["label"].to_numpy(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, size=cap, replace=False) if len(members) > cap else members)
    kept = np.sort(np.concatenate(keep))
    return ds if len(kept) == len(ds) else ds.select(kept)
