"""Visual question answering data: VQA-RAD, SLAKE and PathVQA (local files or the Hugging Face Hub),
and the easy-vqa package's shapes (offline), all in one standard form.

Every format ends as ``VQAData``: a train and a test ``datasets.Dataset`` with the columns

- ``image`` (``datasets.Image``) and ``image_key`` (its path, or a hash of its bytes: rows that share an
  image share the key, so each image is encoded once);
- ``question`` (stripped text), ``answer`` (lower case, single spaces), ``closed`` (bool: a closed
  question, answered from the closed answers, yes/no in the usual sets);
- ``question_type`` (the format's type of question, or null) and the format's client fields
  (``FORMAT_FIELDS``: vqa-rad ``organ``; slake ``organ``, ``modality``; easy-vqa ``shape``, ``color``);
- ``origin``: ``<file>:<row>`` (rows count from 1, in file order), where the row came from.

Closed or open: the format's ``answer_type`` (CLOSED / OPEN) where it has one, else closed means a
yes/no answer (PathVQA's split; easy-vqa). Bad rows (no image file, an image that cannot be read,
an empty question or answer, an answer type that is neither, a test answer that is not among the
training answers and so can never be scored right) are reported with their file and row and, as
``on_bad_row`` says, skipped (each one logged and counted in ``VQAData.bad_rows``) or refused
(``DataError`` naming the file, row and reason). Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from fedprompt.config import DataConfig, VQADataConfig
from fedprompt.data.easy_vqa import easy_vqa_rows
from fedprompt.data.vqa_rows import RawRow, unreadable_row
from fedprompt.errors import DataError
from fedprompt.seeding import derive_seed

log = logging.getLogger("fedprompt.data.vqa")

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "vqa-rad": ("organ",),
    "slake": ("organ", "modality"),
    "pathvqa": (),
    "easy-vqa": ("shape", "color"),
}
"""The client fields each format has besides ``question_type`` (which every format may have)."""

CLOSED_TYPES = {"CLOSED": True, "OPEN": False}
YES_NO = ("yes", "no")
VQARAD_FILE = "VQA_RAD Dataset Public.json"
VQARAD_IMAGES = "VQA_RAD Image Folder"
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class BadRow:
    """A row left out of the data: where it was and why."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}"


@dataclass
class VQAData:
    """A VQA task: owns its train and test questions (standard columns, see the module), the answer
    vocabulary (the training answers, sorted; labels index it), which answers closed questions take,
    the client fields its rows carry, and the rows left out (``bad_rows``)."""

    train: datasets.Dataset
    test: datasets.Dataset
    answers: list[str]
    closed_answers: list[str]
    fields: tuple[str, ...]
    bad_rows: list[BadRow] = field(default_factory=list)

    def labels(self, split: datasets.Dataset) -> np.ndarray:
        """The answer indices of a split's rows (every answer is in the vocabulary)."""
        index = {answer: i for i, answer in enumerate(self.answers)}
        return np.array([index[a] for a in split["answer"]], dtype=np.int64)


class BadRowPolicy:
    """Owns what happens to bad rows: ``skip`` logs and counts each one, ``error`` raises DataError."""

    def __init__(self, on_bad_row: str) -> None:
        self.on_bad_row = on_bad_row
        self.rows: list[BadRow] = []

    def report(self, file: str, row: int, reason: str) -> None:
        bad = BadRow(file, row, reason)
        if self.on_bad_row == "error":
            raise DataError(f"{bad} (set data.vqa.on_bad_row: skip to leave such rows out)")
        log.warning("skipped %s", bad)
        self.rows.append(bad)


# --------------------------------------------------------------------------- entry point


def load_vqa(config: DataConfig, seed: int) -> VQAData:
    """Read the configured VQA data, check every row, build the answer vocabulary from the training
    answers, report test answers outside it, and apply the seeded caps. Raises DataError."""
    vqa = config.vqa
    if vqa is None:
        raise DataError("data.source: vqa needs a data.vqa section")
    policy = BadRowPolicy(vqa.on_bad_row)
    fields = FORMAT_FIELDS[vqa.format]
    if vqa.client_field is not None and vqa.client_field not in ("question_type", *fields):
        raise DataError(
            f"data.vqa.client_field {vqa.client_field!r} is not a field of format {vqa.format}; "
            f"its fields: {['question_type', *fields]}"
        )
    raw = _read_format(vqa, config, seed)
    train = _checked(_cap(raw["train"], vqa.max_train_questions, seed, "train"), policy, fields)
    if len(train) == 0:
        raise DataError(
            f"no usable training questions in the {vqa.format} data ({len(policy.rows)} bad rows)"
        )
    answers = sorted(set(train["answer"]))
    test = _checked(_cap(raw["test"], vqa.max_test_questions, seed, "test"), policy, fields)
    known = set(answers)
    scorable = []
    for i, (answer, origin) in enumerate(zip(test["answer"], test["origin"], strict=True)):
        if answer in known:
            scorable.append(i)
        else:
            file, _, row = origin.rpartition(":")
            policy.report(file, int(row), f"answer {answer!r} is not among the training answers")
    test = test.select(scorable)
    closed = sorted({a for a, c in zip(train["answer"], train["closed"], strict=True) if c})
    if policy.rows:
        reasons = Counter(re.sub(r"'[^']*'", "'…'", bad.reason) for bad in policy.rows)
        log.warning("skipped %d bad rows of the %s data: %s", len(policy.rows), vqa.format, dict(reasons))
    return VQAData(train, test, answers, closed, fields, policy.rows)


def _cap(rows: list[RawRow], cap: int | None, seed: int, what: str) -> list[RawRow]:
    """A seeded choice of ``cap`` rows, in file order, before they are checked (so a bad row among
    them is still reported, and fewer than ``cap`` may remain)."""
    if cap is None or len(rows) <= cap:
        return rows
    rng = np.random.default_rng(derive_seed(seed, "vqa-cap", what))
    return [rows[i] for i in np.sort(rng.choice(len(rows), size=cap, replace=False))]


# --------------------------------------------------------------------------- checking rows


def normalise_answer(answer: Any) -> str:
    """Lower case, stripped, inner whitespace collapsed; numbers become their text."""
    return re.sub(r"\s+", " ", str(answer)).strip().lower()


def _checked(rows: Iterable[RawRow], policy: BadRowPolicy, fields: tuple[str, ...]) -> datasets.Dataset:
    """The rows that pass every check, in the standard columns; the others go to ``policy``."""
    columns: dict[str, list[Any]] = {
        name: [] for name in ("image", "image_key", "question", "answer", "closed", "question_type", "origin")
    }
    columns.update({name: [] for name in fields})
    readable: dict[str, tuple[str, str | None]] = {}
    for row in rows:
        question = row.question.strip() if isinstance(row.question, str) else ""
        answer = normalise_answer(row.answer) if row.answer is not None else ""
        closed = _closed(row.answer_type, answer)
        problem = row.problem or _text_problem(question, answer, closed, row.answer_type)
        image, key = None, None
        if problem is None:
            image, key, problem = _image(row.image, readable)
        if problem is not None:
            policy.report(row.file, row.row, problem)
            continue
        columns["image"].append(image)
        columns["image_key"].append(key)
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["closed"].append(closed)
        columns["question_type"].append(_text_or_none(row.question_type))
        columns["origin"].append(f"{row.file}:{row.row}")
        for name in fields:
            columns[name].append(_text_or_none(row.fields.get(name)))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_key": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "closed": datasets.Value("bool"),
            "question_type": datasets.Value("string"),
            "origin": datasets.Value("string"),
            **{name: datasets.Value("string") for name in fields},
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _text_problem(question: str, answer: str, closed: bool | None, answer_type: Any) -> str | None:
    if not question:
        return "the question is empty"
    if not answer:
        return "the answer is empty"
    if closed is None:
        return f"answer_type {answer_type!r} is neither CLOSED nor OPEN"
    return None


def _closed(answer_type: Any, answer: str) -> bool | None:
    if answer_type is None:
        return answer in YES_NO
    return CLOSED_TYPES.get(str(answer_type).strip().upper())


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _image(image: Any, readable: dict[str, tuple[str, str | None]]) -> tuple[Any, str | None, str | None]:
    """(the value for the Image column, its key, None), or (None, None, why the image is bad).
    ``readable`` remembers each file's path and verdict, so an image that many questions share is
    opened once."""
    if isinstance(image, Image.Image):
        return image, "pil:" + hashlib.sha256(image.tobytes()).hexdigest(), None
    if isinstance(image, dict):
        if image.get("bytes"):
            return image, "sha256:" + hashlib.sha256(image["bytes"]).hexdigest(), None
        image = image.get("path")
    if image is None or image == "":
        return None, None, "the row names no image"
    name = str(image)
    if name not in readable:
        path = str(Path(name).expanduser())
        readable[name] = (path, _unreadable(Path(path)))
    path, problem = readable[name]
    return (None, None, problem) if problem else (path, path, None)


def _unreadable(path: Path) -> str | None:
    """Why the image file cannot be used, or None when it opens as an image."""
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        with Image.open(path) as handle:
            handle.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"image file {str(path)!r} cannot be read as an image ({exc})"
    return None


# --------------------------------------------------------------------------- formats


def _read_format(vqa: VQADataConfig, config: DataConfig, seed: int) -> dict[str, list[RawRow]]:
    """{"train": rows, "test": rows} of the configured format and place."""
    if vqa.format == "easy-vqa":
        return {split: list(easy_vqa_rows(split)) for split in ("train", "test")}
    if vqa.hub is not None:
        return {
            "train": list(_hub_rows(vqa, config.train_split)),
            "test": list(_hub_rows(vqa, config.test_split or "test")),
        }
    assert vqa.path is not None  # VQADataConfig guarantees path or hub
    root = vqa.path.expanduser()
    if not root.exists():
        raise DataError(f"data.vqa.path {str(root)!r} does not exist")
    if vqa.format == "vqa-rad":
        return _vqarad_splits(root, vqa, config, seed)
    if vqa.format == "slake":
        return {
            "train": list(_slake_rows(root, config.train_split, vqa)),
            "test": list(_slake_rows(root, config.test_split or "test", vqa)),
        }
    return {
        "train": list(_table_rows(root, config.train_split, vqa)),
        "test": list(_table_rows(root, config.test_split or "test", vqa)),
    }


def _json_records(path: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r} as JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{str(path)!r} must hold a JSON list of questions, not {type(records).__name__}")
    return records


def _vqarad_splits(root: Path, vqa: VQADataConfig, config: DataConfig, seed: int) -> dict[str, list[RawRow]]:
    """VQA-RAD's public json: one list of questions; test rows have a phrase_type starting with
    'test' (test_freeform, test_para). Without phrase_type, a seeded test_fraction of the images is
    held out (whole images, so no image is in both splits)."""
    file = root if root.is_file() else root / VQARAD_FILE
    if not file.is_file():
        candidates = sorted(root.glob("*.json")) if root.is_dir() else []
        if len(candidates) != 1:
            raise DataError(f"no {VQARAD_FILE!r} in {str(root)!r}; set data.vqa.path to VQA-RAD's json file")
        file = candidates[0]
    images = vqa.image_dir.expanduser() if vqa.image_dir else file.parent / VQARAD_IMAGES
    if vqa.image_dir is None and not images.is_dir():
        images = file.parent
    records = _json_records(file)
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            rows.append((unreadable_row(str(file), number, record), None))
            continue
        name = record.get("image_name")
        rows.append(
            (
                RawRow(
                    str(file),
                    number,
                    images / str(name) if name else None,
                    record.get("question"),
                    record.get("answer"),
                    record.get("answer_type"),
                    record.get("question_type"),
                    {"organ": record.get("image_organ")},
                ),
                record.get("phrase_type"),
            )
        )
    if any(phrase is not None for _, phrase in rows):
        test = [str(phrase or "").startswith("test") for _, phrase in rows]
    else:
        names = sorted({str(row.image) for row, _ in rows})
        rng = np.random.default_rng(seed)
        held = set(rng.choice(names, size=max(1, int(len(names) * config.test_fraction)), replace=False))
        test = [str(row.image) in held for row, _ in rows]
    return {
        "train": [row for (row, _), is_test in zip(rows, test, strict=True) if not is_test],
        "test": [row for (row, _), is_test in zip(rows, test, strict=True) if is_test],
    }


def _slake_rows(root: Path, split: str, vqa: VQADataConfig) -> Iterator[RawRow]:
    """SLAKE's ``<split>.json`` (train, validate, test); images at ``imgs/<img_name>``; questions in
    another q_lang than ``vqa.language`` are left out (counted in a log line, not bad rows)."""
    file = root / f"{split}.json"
    if not file.is_file():
        raise DataError(f"SLAKE split {split!r}: no file {str(file)!r} (SLAKE has train, validate, test)")
    images = vqa.image_dir.expanduser() if vqa.image_dir else root / "imgs"
    other_language = 0
    for number, record in enumerate(_json_records(file), start=1):
        if not isinstance(record, dict):
            yield unreadable_row(str(file), number, record)
            continue
        if vqa.language is not None and record.get("q_lang", vqa.language) != vqa.language:
            other_language += 1
            continue
        name = record.get("img_name")
        yield RawRow(
            str(file),
            number,
            images / str(name) if name else None,
            record.get("question"),
            record.get("answer"),
            record.get("answer_type"),
            record.get("content_type"),
            {"organ": record.get("location"), "modality": record.get("modality")},
        )
    if other_language:
        log.info("%s: left out %d questions not in language %r", file, other_language, vqa.language)


def _table_rows(root: Path, split: str, vqa: VQADataConfig) -> Iterator[RawRow]:
    """A table per split, ``<split>.jsonl/.json/.csv/.parquet`` (PathVQA's question, answer, image
    columns; image paths relative to the folder or ``image_dir``)."""
    files = [root / f"{split}{suffix}" for suffix in TABLE_SUFFIXES if (root / f"{split}{suffix}").is_file()]
    if len(files) != 1:
        raise DataError(
            f"split {split!r}: expected one of {[f'{split}{s}' for s in TABLE_SUFFIXES]} in {str(root)!r}, "
            f"found {[f.name for f in files]}"
        )
    file = files[0]
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[file.suffix]
    try:
        table = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as exc:
        raise DataError(f"cannot read {str(file)!r}: {exc}") from exc
    missing = [c for c in ("image", "question", "answer") if c not in table.column_names]
    if missing:
        raise DataError(f"{str(file)!r} has no column(s) {missing}; its columns are {table.column_names}")
    images = vqa.image_dir.expanduser() if vqa.image_dir else root
    for number, record in enumerate(table, start=1):
        image = record["image"]
        if isinstance(image, str) and image:
            image = images / image
        yield RawRow(
            str(file),
            number,
            image or None,
            record["question"],
            record["answer"],
            record.get("answer_type"),
            record.get("question_type"),
        )


_HUB_FIELDS = {"organ": ("organ", "location", "image_organ"), "modality": ("modality",)}


def _hub_rows(vqa: VQADataConfig, split: str) -> Iterator[RawRow]:
    """A Hub dataset with ``image`` (images), ``question`` and ``answer`` columns (e.g.
    flaviagiammarino/vqa-rad, flaviagiammarino/path-vqa); answer_type, question_type / content_type,
    organ / location / image_organ, modality and q_lang are read when present."""
    assert vqa.hub is not None
    try:
        table = datasets.load_dataset(vqa.hub, split=split)
    except Exception as exc:
        raise DataError(
            f"could not load split {split!r} of the dataset {vqa.hub!r}: {exc}. Without network access, "
            "download it once where there is (the Hugging Face cache then serves it with "
            "HF_HUB_OFFLINE=1), or point data.vqa.path at a local copy in the format's own files."
        ) from exc
    missing = [c for c in ("image", "question", "answer") if c not in table.column_names]
    if missing:
        raise DataError(f"{vqa.hub!r} has no column(s) {missing}; its columns are {table.column_names}")
    if isinstance(table.features["image"], datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    where = f"{vqa.hub}[{split}]"
    columns = set(table.column_names)
    type_column = next((c for c in ("question_type", "content_type") if c in columns), None)
    found = [(name, [c for c in names if c in columns]) for name, names in _HUB_FIELDS.items()]
    other_language = 0
    for number, record in enumerate(table, start=1):
        if vqa.language is not None and record.get("q_lang", vqa.language) != vqa.language:
            other_language += 1
            continue
        fields = {name: next((record[c] for c in names), None) for name, names in found}
        yield RawRow(
            where,
            number,
            record["image"],
            record["question"],
            record["answer"],
            record.get("answer_type"),
            record[type_column] if type_column else None,
            fields,
        )
    if other_language:
        log.info("%s: left out %d questions not in language %r", where, other_language, vqa.language)
