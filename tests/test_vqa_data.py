"""VQA loaders on the real file formats (SLAKE, VQA-RAD, a PathVQA table, a Hub-style folder), their
bad-row paths, client fields, easy-vqa, and the majority-answer baselines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from vqa_support import (
    VQARAD_JSON,
    append_bad_slake_rows,
    write_hub_folder,
    write_pathvqa,
    write_slake,
    write_vqarad,
)

from fedprompt.config import ConfigError, DataConfig, load_config
from fedprompt.data.easy_vqa import pixel_attributes, read_split, shape_images
from fedprompt.data.vqa import load_vqa
from fedprompt.errors import DataError
from fedprompt.tasks.clip.vqa import majority_baselines


def vqa_config(**vqa) -> DataConfig:
    return DataConfig(source="vqa", vqa=vqa)


def test_slake_format_standard_columns_fields_and_language(tmp_path):
    root = write_slake(tmp_path / "slake", {"train": 8, "test": 4})
    data = load_vqa(vqa_config(format="slake", path=str(root)), seed=0)
    assert (len(data.train), len(data.test)) == (16, 8)  # the 16 Chinese twins are left out
    assert data.fields == ("organ", "modality")
    assert data.train.column_names == [
        "image",
        "image_key",
        "question",
        "answer",
        "closed",
        "question_type",
        "origin",
        "organ",
        "modality",
    ]
    assert data.answers == ["blue", "green", "no", "red", "yellow", "yes"]
    assert data.closed_answers == ["no", "yes"]
    first = data.train[0]
    assert first["origin"] == f"{root / 'train.json'}:1" and first["organ"] == "Head"
    assert first["closed"] is False and first["question"] == "what color is the square?"
    assert first["image_key"] == str(root / "imgs" / "xmlab0" / "source.jpg")
    assert first["image"].size == (32, 32)
    assert set(data.train["modality"]) == {"CT", "MRI"} and set(data.train["question_type"]) == {"Color"}
    assert data.train["closed"] == [False, True] * 8
    assert data.bad_rows == []
    both = load_vqa(vqa_config(format="slake", path=str(root), language=None), seed=0)
    assert len(both.train) == 32


def test_vqarad_format_splits_by_phrase_type(tmp_path):
    root = write_vqarad(tmp_path / "rad", {"train": 6, "test": 3})
    data = load_vqa(vqa_config(format="vqa-rad", path=str(root), client_field="organ"), seed=0)
    assert (len(data.train), len(data.test)) == (12, 6)
    assert set(data.train["organ"]) == {"HEAD", "CHEST"}
    assert set(data.test["image_key"]).isdisjoint(data.train["image_key"])
    assert set(data.train["question_type"]) == {"COLOR", "PRES"}
    same = load_vqa(
        vqa_config(format="vqa-rad", path=str(root / VQARAD_JSON)), seed=0
    )  # the json file itself
    assert same.train["question"] == data.train["question"]


def test_vqarad_without_phrase_type_holds_out_whole_images(tmp_path):
    root = write_vqarad(tmp_path / "rad", {"train": 10})
    records = json.loads((root / VQARAD_JSON).read_text())
    (root / VQARAD_JSON).write_text(
        json.dumps([{k: v for k, v in r.items() if k != "phrase_type"} for r in records])
    )
    data = load_vqa(
        DataConfig(source="vqa", test_fraction=0.3, vqa={"format": "vqa-rad", "path": str(root)}), seed=1
    )
    # 3 of 10 images go to test with both their questions; a test answer no training image has is reported
    assert len(data.train) == 14 and len(data.test) + len(data.bad_rows) == 6
    assert all("not among the training answers" in bad.reason for bad in data.bad_rows)
    assert set(data.test["image_key"]).isdisjoint(data.train["image_key"])


def test_pathvqa_table_closed_means_yes_no(tmp_path):
    root = write_pathvqa(tmp_path / "path", {"train": 6, "test": 2})
    data = load_vqa(vqa_config(format="pathvqa", path=str(root)), seed=0)
    assert (len(data.train), len(data.test)) == (12, 4)
    assert data.train["closed"] == [a in ("yes", "no") for a in data.train["answer"]]
    assert data.train["question_type"] == [None] * 12 and data.fields == ()


def test_hub_loading_reads_a_dataset_with_image_bytes(tmp_path):
    root = write_hub_folder(tmp_path / "hub", {"train": 5, "test": 2})
    data = load_vqa(vqa_config(format="pathvqa", hub=str(root)), seed=0)
    assert (len(data.train), len(data.test)) == (10, 4)
    assert all(key.startswith("sha256:") for key in data.train["image_key"])
    assert len(set(data.train["image_key"])) == 5  # each image's two questions share its key
    assert data.train[1]["closed"] is True and data.train[0]["image"].size == (32, 32)


def test_every_bad_row_is_skipped_counted_and_logged_with_file_and_row(tmp_path, caplog):
    root = write_slake(tmp_path / "slake", {"train": 8, "test": 4})
    expected = append_bad_slake_rows(root)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.vqa"):
        data = load_vqa(vqa_config(format="slake", path=str(root)), seed=0)
    assert (len(data.train), len(data.test)) == (16, 8)
    found = {(bad.file, bad.row): bad.reason for bad in data.bad_rows}
    assert found.keys() == expected.keys()
    for where, fragment in expected.items():
        assert fragment in found[where]
        assert f"skipped {where[0]} row {where[1]}: {found[where]}" in caplog.text
    assert f"skipped {len(expected)} bad rows of the slake data" in caplog.text


@pytest.mark.parametrize("kind", range(7))
def test_on_bad_row_error_names_the_file_row_and_reason(tmp_path, kind):
    root = write_slake(tmp_path / "slake", {"train": 4, "test": 2})
    expected = sorted(append_bad_slake_rows(root).items())
    # keep only the bad row under test: rewrite the files without the others
    (file, row), fragment = expected[kind]
    for path in (root / "train.json", root / "test.json"):
        records = json.loads(path.read_text())
        keep = [
            r
            for i, r in enumerate(records, start=1)
            if (str(path), i) not in dict(expected) or (str(path), i) == (file, row)
        ]
        path.write_text(json.dumps(keep, ensure_ascii=False))
    row = [i for i, r in enumerate(json.loads(Path(file).read_text()), start=1)][-1]
    with pytest.raises(DataError, match="on_bad_row: skip") as error:
        load_vqa(vqa_config(format="slake", path=str(root), on_bad_row="error"), seed=0)
    assert f"{file} row {row}: " in str(error.value) and fragment in str(error.value)


def test_missing_folders_files_and_columns_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_vqa(vqa_config(format="slake", path=str(tmp_path / "nowhere")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"SLAKE split 'train': no file"):
        load_vqa(vqa_config(format="slake", path=str(tmp_path / "empty")), seed=0)
    with pytest.raises(DataError, match=r"no 'VQA_RAD Dataset Public\.json'"):
        load_vqa(vqa_config(format="vqa-rad", path=str(tmp_path / "empty")), seed=0)
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "train.jsonl").write_text(
        json.dumps({"img": "a.png", "question": "q", "answer": "a"})
    )
    with pytest.raises(DataError, match=r"has no column\(s\) \['image'\]"):
        load_vqa(vqa_config(format="pathvqa", path=str(tmp_path / "table")), seed=0)
    root = write_slake(tmp_path / "slake", {"train": 2, "test": 1})
    with pytest.raises(DataError, match=r"client_field 'shape' is not a field of format slake"):
        load_vqa(vqa_config(format="slake", path=str(root), client_field="shape"), seed=0)


def test_vqa_config_errors():
    with pytest.raises(ConfigError, match="exactly one of path"):
        load_config({"data": {"source": "vqa", "vqa": {"format": "slake"}}})
    with pytest.raises(ConfigError, match="easy-vqa package; remove path"):
        load_config({"data": {"source": "vqa", "vqa": {"format": "easy-vqa", "path": "x"}}})
    with pytest.raises(ConfigError, match="source: vqa needs a `vqa` section"):
        load_config({"data": {"source": "vqa"}})
    clip = {"kind": "open-clip", "model": "bundled:demo-clip"}
    with pytest.raises(ConfigError, match=r"vqa-twin answers questions and goes with data\.source: vqa"):
        load_config({"backbone": clip, "prompt": {"kind": "coop"}, "data": {"source": "vqa", "vqa": {}}})
    with pytest.raises(ConfigError, match=r"image datasets need backbone\.kind: open-clip"):
        load_config({"data": {"source": "vqa", "vqa": {}}})


def test_seeded_caps(tmp_path):
    root = write_slake(tmp_path / "slake", {"train": 8, "test": 4})
    config = vqa_config(format="slake", path=str(root), max_train_questions=5, max_test_questions=3)
    first, again = load_vqa(config, seed=3), load_vqa(config, seed=3)
    assert len(first.train) == 5 and len(first.test) + len(first.bad_rows) == 3  # chosen, then checked
    assert first.train["origin"] == again.train["origin"]
    assert load_vqa(config, seed=4).train["origin"] != first.train["origin"]


def test_easy_vqa_question_types_and_answers():
    data = load_vqa(vqa_config(format="easy-vqa", max_train_questions=400, max_test_questions=200), seed=0)
    assert len(data.answers) == 13 and data.closed_answers == ["no", "yes"]
    assert data.fields == ("shape", "color")
    for row in data.train.select(range(40)):
        expected = (
            "yes/no"
            if row["answer"] in ("yes", "no")
            else ("shape" if row["answer"] in ("circle", "rectangle", "triangle") else "color")
        )
        assert row["question_type"] == expected and row["closed"] == (expected == "yes/no")
        if expected == "shape":
            assert row["answer"] == row["shape"]
        if expected == "color":
            assert row["answer"] == row["color"]


def test_easy_vqa_pixel_rule_agrees_with_stated_attributes():
    """The fallback that reads shape and colour from the pixels gives what the questions state."""
    stated = {}
    data = read_split("train")
    for question, answer, image in zip(data.questions, data.answers, data.image_ids, strict=True):
        if question.startswith("what") and image < 300:
            kind = "shape" if answer in ("circle", "rectangle", "triangle") else "color"
            stated.setdefault(image, {})[kind] = answer
    assert len(stated) > 250
    for image, facts in stated.items():
        seen = pixel_attributes(data.image_paths[image])
        assert {k: seen[k] for k in facts} == facts, image
    images = shape_images("train")
    assert len(images) == 4000 and all(
        images[i].shape == facts.get("shape", images[i].shape) for i, facts in stated.items()
    )


def test_majority_baselines_by_hand(tmp_path):
    root = write_vqarad(tmp_path / "rad", {"train": 6, "test": 3})
    data = load_vqa(vqa_config(format="vqa-rad", path=str(root)), seed=0)
    # train: colours red, green, blue, yellow, red, green (open); closed answers yes, no, yes, no, yes, no
    train_open = [a for a, c in zip(data.train["answer"], data.train["closed"], strict=True) if not c]
    assert train_open == ["red", "green", "blue", "yellow", "red", "green"]
    test_open = [a for a, c in zip(data.test["answer"], data.test["closed"], strict=True) if not c]
    test_closed = [a for a, c in zip(data.test["answer"], data.test["closed"], strict=True) if c]
    baselines = majority_baselines(data)
    # open majority: green (2) and red (2) tie; Counter keeps first-seen order, so red
    assert baselines["open"] == np.mean([a == "red" for a in test_open])
    closed_top = "yes" if data.train["answer"].count("yes") >= data.train["answer"].count("no") else "no"
    assert baselines["closed"] == np.mean([a == closed_top for a in test_closed])
    assert baselines["type_color"] == baselines["open"] and baselines["type_pres"] == baselines["closed"]
    assert (
        baselines["global"]
        == (baselines["open"] * len(test_open) + baselines["closed"] * len(test_closed)) / 6
    )
