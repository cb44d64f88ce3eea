"""Multi-domain images: the folder layouts of DomainNet, PACS and Office-style sets, the builtin
digit-domains, the domains partition and the configuration checks around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedprompt.config import DIGIT_DOMAINS, ConfigError, DataConfig, load_config
from fedprompt.data.digit_domains import domain_rows, evaluation_rows
from fedprompt.data.domains import load_domain_images
from fedprompt.data.images import digit_arrays, digit_pretraining_split
from fedprompt.data.partition import partition_by_domain
from fedprompt.errors import DataError

CLASSES = ("apple", "bus", "cat_face")


def _write_domains(root: Path, domains: dict[str, int], images_folder: bool = False) -> Path:
    """``root/<domain>[/images]/<class>/<i>.png``: ``count`` small images per class, each domain its
    own colour so a test can tell which domain an image came from."""
    for index, (domain, count) in enumerate(domains.items()):
        base = root / domain / "images" if images_folder else root / domain
        for label, name in enumerate(CLASSES):
            (base / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((8, 8, 3), (40 * index, 80 * label, i), dtype=np.uint8)
                Image.fromarray(pixels).save(base / name / f"{domain}_{name}_{i}.png")
    return root


def _domain_config(root: Path, **domains) -> DataConfig:
    return DataConfig(source="domain-folder", name=str(root), test_fraction=0.25, domains=domains or None)


def _colours(dataset) -> set[int]:
    return {int(np.asarray(image)[0, 0, 0]) for image in dataset["image"]}


def test_a_domain_folder_gives_each_domain_its_images_and_a_stratified_test_split(tmp_path):
    root = _write_domains(tmp_path / "set", {"clipart": 4, "real": 8, "sketch": 4})
    data = load_domain_images(_domain_config(root), seed=0)
    assert data.domains == ["clipart", "real", "sketch"] and data.held_out is None
    assert data.class_names == ["apple", "bus", "cat face"]  # cleaned as CLIP reads them
    train_domains, test_domains = np.asarray(data.train["domain"]), np.asarray(data.test["domain"])
    assert np.bincount(train_domains).tolist() == [9, 18, 9]  # per class: 3 of 4, 6 of 8 to train
    assert np.bincount(test_domains).tolist() == [3, 6, 3]
    for split, domains in ((data.train, train_domains), (data.test, test_domains)):
        for index in range(3):  # an image's domain column names the folder it came from
            rows = np.flatnonzero(domains == index).tolist()
            assert _colours(split.select(rows)) == {40 * index}
    paths = {image.filename for image in data.train["image"]} & {
        image.filename for image in data.test["image"]
    }
    assert not paths  # no image in both splits
    again = load_domain_images(_domain_config(root), seed=0)
    assert again.test["label"] == data.test["label"] and again.test["domain"] == data.test["domain"]


def test_a_held_out_domain_is_never_trained_on_and_is_tested_apart(tmp_path):
    root = _write_domains(tmp_path / "set", {"a": 4, "b": 4, "c": 4})
    data = load_domain_images(_domain_config(root, held_out="b"), seed=0)
    assert data.domains == ["a", "c"] and data.held_out == "b"
    assert _colours(data.train) == _colours(data.test) == {0, 80}  # a and c only
    assert data.held_out_test is not None and _colours(data.held_out_test) == {40}
    assert set(data.held_out_test["domain"]) == {-1}
    only = load_domain_images(_domain_config(root, include=["a", "b"], held_out="a"), seed=0)
    assert only.domains == ["b"] and _colours(only.held_out_test) == {0}


def test_domainnet_and_pacs_split_lists_are_used_and_name_a_missing_file(tmp_path):
    root = _write_domains(tmp_path / "domainnet", {"clipart": 2, "real": 2})
    for domain in ("clipart", "real"):  # DomainNet: "<domain>/<class>/<file> <label>", paths from the root
        train = [f"{domain}/{c}/{domain}_{c}_0.png {i}" for i, c in enumerate(CLASSES)]
        test = [f"{domain}/{c}/{domain}_{c}_1.png {i}" for i, c in enumerate(CLASSES)]
        (root / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
        (root / f"{domain}_test.txt").write_text("\n".join(test) + "\n")
    data = load_domain_images(_domain_config(root), seed=0)
    assert len(data.train) == len(data.test) == 6
    assert {image.filename.rsplit("_", 1)[1] for image in data.test["image"]} == {"1.png"}

    pacs = _write_domains(tmp_path / "PACS" / "kfold", {"photo": 2, "sketch": 2})
    (pacs / "splits").mkdir()
    for domain in ("photo", "sketch"):  # PACS: kfold lists, 1-based labels, a "splits" folder
        (pacs / "splits" / f"{domain}_train_kfold.txt").write_text(
            "".join(f"{domain}/{c}/{domain}_{c}_0.png {i + 1}\n" for i, c in enumerate(CLASSES))
        )
        (pacs / "splits" / f"{domain}_test_kfold.txt").write_text(f"{domain}/bus/{domain}_bus_1.png 2\n")
    data = load_domain_images(_domain_config(pacs, split="files"), seed=0)
    assert np.bincount(data.test["domain"]).tolist() == [1, 1]
    assert set(data.test["label"]) == {1}  # the class is the folder's, "bus"

    (pacs / "splits" / "photo_test_kfold.txt").write_text("photo/bus/missing.png 2\n")
    with pytest.raises(DataError, match=r"photo_test_kfold.txt:1: 'photo/bus/missing.png' is not a file"):
        load_domain_images(_domain_config(pacs, split="files"), seed=0)


def test_office_style_images_folders_unknown_domains_and_missing_lists(tmp_path):
    root = _write_domains(tmp_path / "office", {"amazon": 4, "webcam": 4}, images_folder=True)
    data = load_domain_images(_domain_config(root), seed=0)  # no lists: auto falls back to a fraction
    assert data.domains == ["amazon", "webcam"] and len(data.class_names) == 3
    with pytest.raises(DataError, match=r"names \['dslr'\], which the data does not have"):
        load_domain_images(_domain_config(root, held_out="dslr"), seed=0)
    with pytest.raises(
        DataError, match=r"split: files, but domains \['amazon', 'webcam'\] have no split lists"
    ):
        load_domain_images(_domain_config(root, split="files"), seed=0)
    (tmp_path / "empty" / "splits").mkdir(parents=True)
    with pytest.raises(DataError, match="has no domain folders"):
        load_domain_images(_domain_config(tmp_path / "empty"), seed=0)


def test_the_builtin_digit_domains_never_test_on_what_the_demo_backbone_saw():
    rows = domain_rows()
    everything = np.concatenate(rows)
    assert len(everything) == len(set(everything.tolist())) == len(digit_arrays()[1])  # disjoint, complete
    seen = set(digit_pretraining_split()[0])
    assert len(seen) == 179  # the demo backbone's tenth of each class
    assert len(rows) == 6
    for domain, part in zip(DIGIT_DOMAINS, rows, strict=True):
        test = evaluation_rows(part, 0.2, domain)
        assert not seen & set(test.tolist())
        assert 0.15 * len(part) < len(test) < 0.25 * len(part)
        assert np.array_equal(test, evaluation_rows(part, 0.2, domain))  # fixed, whatever the run
    data = load_domain_images(
        DataConfig(source="builtin", name="digit-domains", domains={"held_out": "noisy"}), 7
    )
    assert (
        data.domains == ["plain", "inverted", "textured", "rotated", "outline"] and data.held_out == "noisy"
    )
    assert data.class_names[0] == "zero" and data.class_names[-1] == "nine"
    first = np.asarray(data.test["image"][0])
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8


def test_domains_partition_keeps_every_domain_on_its_own_clients():
    domains = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0])
    parts = partition_by_domain(domains, 3, 2, 6, seed=5)
    assert len(parts) == 6
    for cid, part in enumerate(parts):
        assert set(domains[part].tolist()) == {cid // 2}  # clients 2d, 2d + 1 hold domain d only
    for domain in range(3):
        held = np.concatenate([parts[2 * domain], parts[2 * domain + 1]])
        assert sorted(held.tolist()) == np.flatnonzero(domains == domain).tolist()  # all of it
        assert abs(len(parts[2 * domain]) - len(parts[2 * domain + 1])) <= 1
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition_by_domain(domains, 3, 2, 6, seed=5)]
    with pytest.raises(DataError, match=r"set partition\.num_clients: 6"):
        partition_by_domain(domains, 3, 2, 4, seed=5)
    with pytest.raises(DataError, match="domain 0 has 5 training examples for 6 clients"):
        partition_by_domain(domains, 3, 6, 18, seed=5)


DIGIT_DOMAINS_RUN = {
    "backbone": {"kind": "open-clip", "model": "ViT-B-32", "pretrained": None},
    "prompt": {"kind": "coop"},
    "data": {"source": "builtin", "name": "digit-domains", "domains": {"held_out": "noisy"}},
    "partition": {"kind": "domains", "num_clients": 5},
    "federation": {"min_clients": 2},
}


def test_config_checks_around_domains():
    assert load_config(DIGIT_DOMAINS_RUN).partition.num_clients == 5
    with pytest.raises(
        ConfigError, match=r"5 domains \(plain, inverted, textured, rotated, outline\) × clients_per_domain 2"
    ):
        load_config(DIGIT_DOMAINS_RUN, ["partition.clients_per_domain=2"])
    with pytest.raises(ConfigError, match=r"partition\.kind domains gives each domain its own clients"):
        load_config({**DIGIT_DOMAINS_RUN, "data": {"source": "builtin", "name": "digits"}})
    with pytest.raises(ConfigError, match=r"names \['sketch'\], which the data does not have"):
        load_config(DIGIT_DOMAINS_RUN, ["data.domains.held_out=sketch"])
    with pytest.raises(ConfigError, match="held_out 'noisy' is not among include"):
        load_config(DIGIT_DOMAINS_RUN, ["data.domains.include=[plain,inverted]"])
    with pytest.raises(ConfigError, match=r"the `domains` section applies to multi-domain images"):
        load_config({**DIGIT_DOMAINS_RUN, "data": {"source": "builtin", "name": "digits", "domains": {}}})
    with pytest.raises(ConfigError, match=r"novel_class_fraction .* and multi-domain images"):
        load_config(DIGIT_DOMAINS_RUN, ["data.novel_class_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"clients_per_domain applies to partition\.kind domains only"):
        load_config(DIGIT_DOMAINS_RUN, ["partition.kind=iid", "partition.clients_per_domain=2"])
