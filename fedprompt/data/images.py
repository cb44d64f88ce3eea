"""Labelled images for classification: a builtin set, the Hugging Face Hub, or a local image folder.

Every source ends in the same shape (`ImageClassificationData`): a train and a test
``datasets.Dataset`` with exactly the columns ``image`` (a ``datasets.Image``) and ``label`` (a
ClassLabel: ints 0..C-1), and the class names, which CLIP reads as text (cleaned for it:
``aquarium_fish`` becomes ``aquarium fish`` whatever the source). Splitting off a test set,
per-class caps and the base/novel class split are seeded or fixed, as for text.

``digits`` is scikit-learn's bundled handwritten digits (1,797 8×8 grey images, classes "zero"
to "nine"), built in memory; it needs scikit-learn (a test dependency), and says so when missing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from fedprompt.config import DataConfig
from fedprompt.data.loading import prepare_splits, with_builtin_columns
from fedprompt.errors import DataError
from fedprompt.seeding import derive_seed

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_PRETRAINING_SEED = 0
DEMO_PRETRAINING_FRACTION = 0.1
"""The demo backbone's recipe seed and the share of each digit class it is pre-trained on (its
defaults, ``tasks.clip.demo_backbone.DemoClipRecipe``): ``digit_pretraining_split`` of these gives
the digit images ``bundled:demo-clip`` has seen, which test splits must leave out."""


@dataclass
class ImageClassificationData:
    """An image classification task: owns its train and test splits and its class names.

    Both splits have exactly the columns ``image`` and ``label`` (ints over 0..C-1, in
    `label_names` order).
    """

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]


@dataclass
class BaseNovelSplit:
    """Base-to-novel classes: train on base classes, test on base and on novel classes apart.

    ``train`` and ``base_test`` keep the base labels 0..B-1; ``novel_test``'s labels are
    renumbered 0..N-1 in ``novel_names`` order.
    """

    train: datasets.Dataset
    base_test: datasets.Dataset
    novel_test: datasets.Dataset
    base_names: list[str]
    novel_names: list[str]


@dataclass(frozen=True)
class PooledDataset:
    """One dataset's place in a pooled image task: its name in metrics (``<label>_base_accuracy``)
    and the ranges [start, stop) of the task's training classes and novel classes that are its own."""

    label: str
    classes: tuple[int, int]
    novel_classes: tuple[int, int] | None = None


@dataclass
class ImageTask:
    """What a CLIP run trains and tests on: one image dataset, or several pooled (FedTPG).

    ``train`` and ``test`` have labels over ``class_names`` (the training classes: all classes,
    or the base classes in base-to-novel runs); ``novel_test`` (base-to-novel only) has labels
    over ``novel_names``. ``datasets`` (pooled only) says which class ranges belong to which
    dataset: every pooled dataset keeps its classes together, in its own label order.
    ``domain_names`` (multi-domain images only) are the trained domains, which the ``domain``
    column of ``train`` and ``test`` indexes; ``held_out_test`` is the held-out domain's test split.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    novel_test: datasets.Dataset | None = None
    novel_names: list[str] | None = None
    datasets: list[PooledDataset] | None = None
    domain_names: list[str] | None = None
    held_out_domain: str | None = None
    held_out_test: datasets.Dataset | None = None


def load_image_task(config: DataConfig, seed: int) -> ImageTask:
    """Load the configured image data (each dataset of ``source: datasets``, pooled in order), split
    base and novel classes when ``novel_class_fraction`` is set. Raises DataError. (Multi-domain
    images load with ``fedprompt.data.domains.load_domain_task``.)"""
    if config.multi_domain:
        raise DataError("multi-domain images load with fedprompt.data.domains.load_domain_task")
    entries = config.datasets if config.source == "datasets" and config.datasets else [config]
    pooled = config.source == "datasets"
    parts: list[ImageTask] = []
    for index, entry in enumerate(entries):
        data = load_image_classification(entry, derive_seed(seed, "dataset", index) if pooled else seed)
        if config.novel_class_fraction is None:
            parts.append(ImageTask(data.train, data.test, data.label_names))
            continue
        split = split_base_novel(data, config.novel_class_fraction)
        parts.append(
            ImageTask(split.train, split.base_test, split.base_names, split.novel_test, split.novel_names)
        )
    if not pooled:
        return parts[0]
    labels = _dataset_labels(entries)
    classes, novel = (
        _ranges([len(p.class_names) for p in parts]),
        _ranges([len(p.novel_names or []) for p in parts]),
    )
    return ImageTask(
        train=_pool([p.train for p in parts], [start for start, _ in classes]),
        test=_pool([p.test for p in parts], [start for start, _ in classes]),
        class_names=[name for p in parts for name in p.class_names],
        novel_test=None
        if config.novel_class_fraction is None
        else _pool([p.novel_test for p in parts if p.novel_test is not None], [start for start, _ in novel]),
        novel_names=None
        if config.novel_class_fraction is None
        else [n for p in parts for n in p.novel_names or []],
        datasets=[
            PooledDataset(label, span, novel_span if config.novel_class_fraction is not None else None)
            for label, span, novel_span in zip(labels, classes, novel, strict=True)
        ],
    )


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return [(starts[i], starts[i + 1]) for i in range(len(sizes))]


def _pool(parts: list[datasets.Dataset], offsets: list[int]) -> datasets.Dataset:
    """The datasets one after the other, each one's labels shifted by its offset (plain ints)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    shifted = []
    for part, offset in zip(parts, offsets, strict=True):
        labels = np.asarray(part.with_format("arrow")["label"].to_numpy(), dtype=np.int64) + offset
        shifted.append(part.remove_columns("label").add_column("label", labels.tolist()).cast(features))
    return datasets.concatenate_datasets(shifted)


def _dataset_labels(entries: list[DataConfig]) -> list[str]:
    """A short, distinct metric name per dataset: its builtin or Hub name's last part, or its folder's."""
    labels: list[str] = []
    for index, entry in enumerate(entries):
        stem = re.sub(r"[^a-z0-9]+", "-", Path(entry.name or "").name.lower()).strip("-") or f"dataset{index}"
        label, n = stem, 2
        while label in labels:
            label, n = f"{stem}-{n}", n + 1
        labels.append(label)
    return labels


def digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: 8×8 uint8 images (0..16 scaled to 0..255) [1797, 8, 8] and labels
    (fresh copies of arrays read once per process)."""
    pixels, labels = _digits()
    return pixels.copy(), labels.copy()


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the builtin image dataset 'digits' needs scikit-learn: pip install scikit-learn"
        ) from exc
    bunch = sklearn_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return pixels, bunch.target


def digit_pretraining_split(
    seed: int = DEMO_PRETRAINING_SEED,
    fraction: float = DEMO_PRETRAINING_FRACTION,
    held_out_digits: tuple[str, ...] = (),
    max_images: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Row indices of scikit-learn's digits as the demo backbone of recipe ``seed`` divides them:
    (pre-training rows, unseen rows of seen classes, rows of the held-out classes), each sorted. The
    pre-training rows are a seeded ``fraction`` of each seen class (at most ``max_images`` in all)."""
    _, targets = digit_arrays()
    rng = np.random.default_rng(derive_seed(seed, "demo-clip", "digit-split"))
    held = {DIGIT_NAMES.index(name) for name in held_out_digits}
    seen_rows, unseen_rows = [], []
    for label in sorted(set(range(10)) - held):
        members = rng.permutation(np.flatnonzero(targets == label))
        count = round(len(members) * fraction)
        seen_rows.extend(members[:count].tolist())
        unseen_rows.extend(members[count:].tolist())
    held_rows = np.flatnonzero(np.isin(targets, sorted(held))).tolist()
    if max_images is not None:
        seen_rows = sorted(rng.permutation(seen_rows)[:max_images].tolist())
    return sorted(seen_rows), sorted(unseen_rows), held_rows


def load_digits(seed: int) -> datasets.Dataset:
    """scikit-learn's bundled digits as 8×8 greyscale images (0..16 scaled to 0..255)."""
    pixels, labels = digit_arrays()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_NAMES))}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": labels.tolist()},
        features=features,
    )


IMAGE_BUILTINS: dict[str, Callable[[int], datasets.Dataset]] = {"digits": load_digits}
IMAGE_BUILTIN_COLUMNS: dict[str, dict[str, str]] = {
    "digits": {"image_column": "image", "label_column": "label"}
}
"""The columns each builtin image dataset has (the config's column fields are set to these)."""


def load_image_classification(config: DataConfig, seed: int) -> ImageClassificationData:
    """Load the configured images, standardise them to ``image``/``label`` and split off a test set.

    A builtin dataset's own columns replace the config's column fields (``with_builtin_columns``).
    As for text: labels become class indices (`config.label_names` order when given); without a
    test split a seeded stratified `test_fraction` of train is held out; then `max_per_class`
    (few-shot) and `max_test_examples` caps, both seeded. Raises DataError.
    """
    config = with_builtin_columns(config, IMAGE_BUILTIN_COLUMNS)
    train, test, label_names = prepare_splits(_load_splits(config, seed), config, seed, _select_columns)
    return ImageClassificationData(train=train, test=test, label_names=clean_class_names(label_names))


def clean_class_name(name: str) -> str:
    """A class name as CLIP should read it: underscores become spaces (``aquarium_fish`` ->
    ``aquarium fish``, as CoOp and FedTPG do), runs of white space one space, ends stripped."""
    return " ".join(name.replace("_", " ").split())


def clean_class_names(names: list[str]) -> list[str]:
    """``clean_class_name`` of each name; raises DataError when two names become one, or one empty."""
    cleaned = [clean_class_name(name) for name in names]
    empty = [name for name, clean in zip(names, cleaned, strict=True) if not clean]
    if empty:
        raise DataError(
            f"class names {empty[:3]} are empty once cleaned; give readable names (data.label_names)"
        )
    if len(set(cleaned)) != len(cleaned):
        seen: dict[str, str] = {}
        for name, clean in zip(names, cleaned, strict=True):
            if clean in seen:
                raise DataError(
                    f"class names {seen[clean]!r} and {name!r} both read {clean!r} once underscores become "
                    "spaces; give distinct names (data.label_names)"
                )
            seen[clean] = name
    return cleaned


def split_base_novel(data: ImageClassificationData, novel_fraction: float) -> BaseNovelSplit:
    """Split the classes in label order: the last floor(C · novel_fraction) are novel, the rest
    base (CoOp's and FedTPG's protocol at 0.5: base = the first ceil(C / 2) classes).

    Raises DataError when either side would be empty.
    """
    count = len(data.label_names)
    novel = int(count * novel_fraction)
    base = count - novel
    if novel < 1 or base < 1:
        raise DataError(
            f"data.novel_class_fraction {novel_fraction} of {count} classes leaves "
            f"{base} base and {novel} novel classes; both need at least one"
        )

    names = data.label_names

    def keep(ds: datasets.Dataset, novel_side: bool) -> datasets.Dataset:
        labels = np.asarray(ds.with_format("arrow")["label"].to_numpy(), dtype=np.int64)
        rows = np.flatnonzero(labels >= base if novel_side else labels < base)
        kept_names, offset = (names[base:], base) if novel_side else (names[:base], 0)
        feature = datasets.ClassLabel(names=list(kept_names))
        return (
            ds.select(rows)
            .remove_columns("label")
            .add_column("label", labels[rows] - offset, feature=feature)
        )

    return BaseNovelSplit(
        train=keep(data.train, False),
        base_test=keep(data.test, False),
        novel_test=keep(data.test, True),
        base_names=list(names[:base]),
        novel_names=list(names[base:]),
    )


# --------------------------------------------------------------------------- sources


def _load_splits(config: DataConfig, seed: int) -> dict[str, datasets.Dataset]:
    assert config.name is not None  # DataConfig guarantees a name for these sources
    if config.source == "builtin":
        if config.name not in IMAGE_BUILTINS:
            raise DataError(
                f"{config.name!r} is not a builtin image dataset; choose one of {sorted(IMAGE_BUILTINS)}"
            )
        try:
            return {"train": IMAGE_BUILTINS[config.name](seed)}
        except ImportError as exc:
            raise DataError(str(exc)) from exc
    if config.source == "image-folder":
        folder = Path(config.name).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.name {str(folder)!r} is not a folder (source: image-folder)")
        return _load(("imagefolder",), {"data_dir": str(folder)}, f"the image folder {str(folder)!r}")
    if config.source == "hub":
        args = (config.name, config.subset) if config.subset else (config.name,)
        return _load(args, {}, f"the dataset {config.name!r}")
    raise DataError(f"data.source {config.source!r} does not hold images; use builtin, hub or image-folder")


def _load(args: tuple, kwargs: dict, what: str) -> dict[str, datasets.Dataset]:
    try:
        return dict(datasets.load_dataset(*args, **kwargs))
    except Exception as exc:
        raise DataError(
            f"could not load {what}: {exc}. Without network access, point data.source: image-folder at "
            "a local folder with one subfolder of images per class, or load the dataset once online so the "
            "Hugging Face cache holds it (HF_HUB_OFFLINE=1 then reads the cache)."
        ) from exc


def _select_columns(ds: datasets.Dataset, split: str, config: DataConfig) -> datasets.Dataset:
    """Keep the image and label columns only, renamed to ``image`` and ``label``."""
    for field, column in (("image_column", config.image_column), ("label_column", config.label_column)):
        if column not in ds.column_names:
            raise DataError(
                f"data.{field} {column!r} is not a column of split {split!r}; "
                f"its columns are {ds.column_names}"
            )
    if config.image_column == config.label_column:
        raise DataError(f"data.image_column and data.label_column are both {config.image_column!r}")
    if not isinstance(ds.features[config.image_column], datasets.Image):
        raise DataError(
            f"data.image_column {config.image_column!r} of split {split!r} holds "
            f"{ds.features[config.image_column]}, not images"
        )
    ds = ds.select_columns([config.image_column, config.label_column])
    renames = {config.image_column: "image", config.label_column: "label"}
    return ds.rename_columns({old: new for old, new in renames.items() if old != new})
