"""Images from several domains: the published folder layouts of multi-domain sets, and the builtin
``digit-domains``.

A domain folder (``data.source: domain-folder``) holds one subfolder per domain and in each one
subfolder of images per class, the layout DomainNet, Office-Caltech-10, PACS (its ``kfold``
folder) and Digits-5-style sets are published in::

    root/<domain>/<class>/<image>            DomainNet, PACS, Office-Caltech-10, Digits-5
    root/<domain>/images/<class>/<image>     Office-31-style (a lone ``images`` folder is stepped into)

A domain's class is the name of the folder its image sits in, whatever label a split list writes
beside it. Test splits come from the dataset's own lists when every domain has them (DomainNet's
``<domain>_train.txt`` / ``<domain>_test.txt``, PACS's ``<domain>_train_kfold.txt`` /
``<domain>_test_kfold.txt``, beside the domain folders or in ``splits/``: one ``<path> <label>``
per line, the path relative to the root or to its parent), else a seeded stratified
``test_fraction`` of each domain. ``max_per_class`` caps each domain's training images per class
and ``max_test_examples`` each domain's test images, both seeded.

Every source ends as ``DomainImages``: train and test splits of the trained domains with the
columns ``image``, ``label`` (over the class names, the union of every used domain's classes, in
sorted order) and ``domain`` (the index of the image's domain among the trained ones), and the
held-out domain's test split apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from fedprompt.config import DIGIT_DOMAINS, DataConfig
from fedprompt.data.images import DIGIT_NAMES, ImageTask, clean_class_names, digit_arrays
from fedprompt.errors import DataError
from fedprompt.seeding import derive_seed

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLIT_LISTS = (("{}_train.txt", "{}_test.txt"), ("{}_train_kfold.txt", "{}_test_kfold.txt"))
"""(train, test) list names of one domain: DomainNet's, then PACS's."""
FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.Value("int64"), "domain": datasets.Value("int64")}
)


@dataclass
class DomainImages:
    """Images of several domains: owns the train and test splits of the trained domains (columns
    ``image``, ``label``, ``domain``), the class names, the trained domains' names (``domain``
    indexes them) and the held-out domain's test split (its ``domain`` is -1)."""

    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    domains: list[str]
    held_out: str | None = None
    held_out_test: datasets.Dataset | None = None


@dataclass
class _Domain:
    """One domain before it becomes a dataset: its train and test items as (image, class name)."""

    name: str
    train: list[tuple[object, str]]
    test: list[tuple[object, str]]


def load_domain_task(config: DataConfig, seed: int) -> ImageTask:
    """The multi-domain images of ``config`` as the image task a CLIP run trains and tests on."""
    data = load_domain_images(config, seed)
    return ImageTask(
        data.train,
        data.test,
        data.class_names,
        domain_names=data.domains,
        held_out_domain=data.held_out,
        held_out_test=data.held_out_test,
    )


def load_domain_images(config: DataConfig, seed: int) -> DomainImages:
    """The multi-domain images ``config`` names (a domain folder or a multi-domain builtin), with its
    ``domains`` section applied. Raises DataError naming what is missing or does not fit."""
    if config.source == "builtin" and config.name == "digit-domains":
        available: Sequence[str] = DIGIT_DOMAINS
        root = None
    else:
        assert config.name is not None  # DataConfig guarantees it for source: domain-folder
        root = Path(config.name).expanduser()
        if not root.is_dir():
            raise DataError(f"data.name {str(root)!r} is not a folder (source: domain-folder)")
        available = _domain_folders(root)
    settings = config.domain_settings
    try:
        trained = config.trained_domains(available)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    used = [*trained, *([settings.held_out] if settings.held_out else [])]
    if root is None:
        parts = _digit_domains(used, config.test_fraction)
    else:
        parts = _folder_domains(root, used, settings.split, config.test_fraction, seed)
    present = {name for part in parts for _, name in part.train + part.test}
    classes = [n for n in DIGIT_NAMES if n in present] if root is None else sorted(present)
    names = clean_class_names(classes)
    index = {name: i for i, name in enumerate(classes)}
    by_name = {part.name: part for part in parts}
    train, test = [], []
    for position, domain in enumerate(trained):
        part = _capped(by_name[domain], config, index, seed)
        train.append(_dataset(part.train, index, position))
        test.append(_dataset(part.test, index, position))
        if not len(train[-1]) or not len(test[-1]):
            raise DataError(
                f"domain {domain!r} has {len(train[-1])} training and {len(test[-1])} test images; "
                "both need at least one"
            )
    held_out_test = None
    if settings.held_out is not None:
        held = _capped(by_name[settings.held_out], config, index, seed)
        held_out_test = _dataset(held.test, index, -1)
    return DomainImages(
        train=datasets.concatenate_datasets(train),
        test=datasets.concatenate_datasets(test),
        class_names=names,
        domains=list(trained),
        held_out=settings.held_out,
        held_out_test=held_out_test,
    )


# --------------------------------------------------------------------------- the builtin set


def _digit_domains(used: Sequence[str], test_fraction: float) -> list[_Domain]:
    """The builtin ``digit-domains`` (``fedprompt.data.digit_domains``) of the ``used`` domains."""
    from fedprompt.data import digit_domains

    try:
        _, labels = digit_arrays()
    except ModuleNotFoundError as exc:
        raise DataError(str(exc)) from exc
    rows = dict(zip(DIGIT_DOMAINS, digit_domains.domain_rows(), strict=True))
    parts = []
    for domain in used:
        test = digit_domains.evaluation_rows(rows[domain], test_fraction, domain)
        train = np.setdiff1d(rows[domain], test)
        parts.append(
            _Domain(
                domain,
                [
                    (image, DIGIT_NAMES[labels[row]])
                    for image, row in zip(digit_domains.domain_images(domain, train), train, strict=True)
                ],
                [
                    (image, DIGIT_NAMES[labels[row]])
                    for image, row in zip(digit_domains.domain_images(domain, test), test, strict=True)
                ],
            )
        )
    return parts


# --------------------------------------------------------------------------- domain folders


def _domain_folders(root: Path) -> list[str]:
    """The domains of a root folder: its subfolders that hold class folders, sorted."""
    domains = [
        entry.name
        for entry in sorted(root.iterdir())
        if entry.is_dir() and not entry.name.startswith(".") and _class_folders(_images_root(entry))
    ]
    if not domains:
        raise DataError(
            f"{str(root)!r} has no domain folders: expected <domain>/<class>/<image> (DomainNet, PACS, "
            "Office-Caltech-10, Digits-5 layouts)"
        )
    return domains


def _images_root(domain: Path) -> Path:
    """Where a domain's class folders are: the domain folder, or its lone ``images`` folder."""
    children = [c for c in domain.iterdir() if c.is_dir() and not c.name.startswith(".")]
    return children[0] if len(children) == 1 and children[0].name == "images" else domain


def _class_folders(folder: Path) -> list[Path]:
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and not c.name.startswith(".")]


def _folder_domains(
    root: Path, used: Sequence[str], split: str, test_fraction: float, seed: int
) -> list[_Domain]:
    lists = {domain: _split_lists(root, domain) for domain in used}
    if split == "files":
        missing = [domain for domain, found in lists.items() if found is None]
        if missing:
            raise DataError(
                f"data.domains.split: files, but domains {missing} have no split lists "
                f"({', '.join(t.format('<domain>') for pair in SPLIT_LISTS for t in pair)}, in "
                f"{str(root)!r} or its splits/ folder); use split: fraction"
            )
    from_files = split == "files" or (split == "auto" and all(found is not None for found in lists.values()))
    parts = []
    for domain in used:
        found = lists[domain]
        if from_files and found is not None:
            train = _read_list(root, found[0])
            test = _read_list(root, found[1])
        else:
            items = _scan(root / domain)
            train, test = _split_fraction(items, test_fraction, derive_seed(seed, "domain-test", domain))
        parts.append(_Domain(domain, train, test))
    return parts


def _split_lists(root: Path, domain: str) -> tuple[Path, Path] | None:
    for folder in (root, root / "splits"):
        for train_name, test_name in SPLIT_LISTS:
            train, test = folder / train_name.format(domain), folder / test_name.format(domain)
            if train.is_file() and test.is_file():
                return train, test
    return None


def _scan(domain: Path) -> list[tuple[object, str]]:
    """Every image of a domain folder as (path, class folder name), in sorted order."""
    items = [
        (str(path), folder.name)
        for folder in _class_folders(_images_root(domain))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataError(f"domain folder {str(domain)!r} holds no images in class folders")
    return items


def _read_list(root: Path, listing: Path) -> list[tuple[object, str]]:
    """The (path, class folder name) items of a split list; DataError naming a missing file's line."""
    items: list[tuple[object, str]] = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        relative = line.split()[0]
        path = next((base / relative for base in (root, root.parent) if (base / relative).is_file()), None)
        if path is None:
            raise DataError(
                f"{listing}:{number}: {relative!r} is not a file under {str(root)!r} or its parent folder"
            )
        items.append((str(path), path.parent.name))
    if not items:
        raise DataError(f"split list {listing} names no images")
    return items


def _split_fraction(
    items: list[tuple[object, str]], fraction: float, seed: int
) -> tuple[list[tuple[object, str]], list[tuple[object, str]]]:
    """A seeded stratified split: per class, round(fraction · n) items (at least one, and one left
    to train on when the class has two or more) go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for name in sorted({name for _, name in items}):
        members = [item for item in items if item[1] == name]
        order = rng.permutation(len(members))
        count = min(max(1, round(fraction * len(members))), max(len(members) - 1, 1))
        test.extend(members[i] for i in sorted(order[:count]))
        train.extend(members[i] for i in sorted(order[count:]))
    return train, test


# --------------------------------------------------------------------------- to datasets


def _capped(part: _Domain, config: DataConfig, index: dict[str, int], seed: int) -> _Domain:
    """``max_per_class`` training images per class and ``max_test_examples`` test images (seeded)."""
    rng = np.random.default_rng(derive_seed(seed, "domain-caps", part.name))
    train = part.train
    if config.max_per_class is not None:
        kept: list[int] = []
        for name in sorted({name for _, name in train}):
            members = [i for i, (_, n) in enumerate(train) if n == name]
            kept.extend(rng.permutation(members)[: config.max_per_class].tolist())
        train = [train[i] for i in sorted(kept)]
    test = part.test
    if config.max_test_examples is not None and len(test) > config.max_test_examples:
        test = [test[i] for i in sorted(rng.permutation(len(test))[: config.max_test_examples].tolist())]
    return _Domain(part.name, train, test)


def _dataset(items: list[tuple[object, str]], index: dict[str, int], domain: int) -> datasets.Dataset:
    images = [image if isinstance(image, Image.Image | str) else str(image) for image, _ in items]
    return datasets.Dataset.from_dict(
        {"image": images, "label": [index[n] for _, n in items], "domain": [domain] * len(items)},
        features=FEATURES,
    )
