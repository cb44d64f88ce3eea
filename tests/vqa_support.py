"""Helpers of the VQA tests: a small VQA set written in the public file formats of SLAKE, VQA-RAD and
PathVQA (and as a local Hub-style dataset folder), with bad rows of every kind on request.

Each image is a coloured square on grey noise (one of the colours of ``clip_support.COLORS``), with
an organ and a modality for client splits. Each image gets one open question ("what color is the
square?", answered with its colour) and one closed question ("is the square <colour>?", yes for its
own colour on every other image, no for another colour otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clip_support import COLORS
from PIL import Image

ORGANS = ("HEAD", "CHEST")
MODALITIES = ("CT", "MRI")


@dataclass(frozen=True)
class Question:
    image: int
    color: str
    question: str
    answer: str
    closed: bool
    organ: str
    modality: str


def square(color: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    image = rng.integers(90, 160, size=(size, size, 3)).astype(np.uint8)
    side = int(rng.integers(size // 3, size * 2 // 3))
    top, left = (int(v) for v in rng.integers(0, size - side, size=2))
    image[top : top + side, left : left + side] = np.array(COLORS[color], dtype=np.uint8)
    return Image.fromarray(image)


def questions(count: int, first_image: int, seed: int) -> list[Question]:
    """Two questions (open, closed) about each of ``count`` images numbered from ``first_image``."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for k in range(count):
        image = first_image + k
        color = names[k % len(names)]
        organ, modality = ORGANS[k % 2], MODALITIES[(k // 2) % 2]
        asked = color if k % 2 == 0 else names[(names.index(color) + 1 + int(rng.integers(3))) % len(names)]
        out.append(Question(image, color, "what color is the square?", color, False, organ, modality))
        out.append(
            Question(
                image,
                color,
                f"is the square {asked}?",
                "yes" if asked == color else "no",
                True,
                organ,
                modality,
            )
        )
    return out


def write_images(folder: Path, items: list[Question], name_of, seed: int, suffix: str = ".jpg") -> None:
    rng = np.random.default_rng(seed)
    for image in sorted({q.image: q for q in items}.values(), key=lambda q: q.image):
        path = folder / name_of(image.image, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        square(image.color, rng).save(path)


def split_questions(per_split: dict[str, int], seed: int) -> dict[str, list[Question]]:
    out, first = {}, 0
    for split, count in per_split.items():
        out[split] = questions(count, first, seed + first)
        first += count
    return out


# --------------------------------------------------------------------------- formats


def write_slake(folder: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """SLAKE's layout: ``<split>.json`` lists and ``imgs/xmlab<k>/source.jpg``; each English question
    also has a Chinese twin (q_lang zh) that an English run leaves out."""

    def name_of(image: int, suffix: str) -> str:
        return f"imgs/xmlab{image}/source{suffix}"

    for split, items in split_questions(per_split, seed).items():
        write_images(folder, items, name_of, seed)
        records = []
        for i, q in enumerate(items):
            base = {
                "img_id": q.image,
                "img_name": f"xmlab{q.image}/source.jpg",
                "location": q.organ.title(),
                "modality": q.modality,
                "answer_type": "CLOSED" if q.closed else "OPEN",
                "base_type": "vqa",
                "content_type": "Color",
                "triple": ["vhead", "_", "_"],
            }
            records.append({**base, "qid": 2 * i, "question": q.question, "answer": q.answer, "q_lang": "en"})
            records.append(
                {**base, "qid": 2 * i + 1, "question": "这是什么颜色?", "answer": q.answer, "q_lang": "zh"}
            )
        (folder / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False))
    return folder


VQARAD_JSON = "VQA_RAD Dataset Public.json"
VQARAD_IMAGES = "VQA_RAD Image Folder"


def write_vqarad(folder: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """VQA-RAD's layout: one json list (test rows have phrase_type test_freeform) and an image folder."""

    def name_of(image: int, suffix: str) -> str:
        return f"{VQARAD_IMAGES}/synpic{image}{suffix}"

    records = []
    for split, items in split_questions(per_split, seed).items():
        write_images(folder, items, name_of, seed)
        for q in items:
            records.append(
                {
                    "qid": len(records) + 1,
                    "image_name": f"synpic{q.image}.jpg",
                    "image_case_url": "https://medpix.nlm.nih.gov/case?id=0",
                    "image_organ": q.organ,
                    "answer": q.answer,
                    "answer_type": "CLOSED" if q.closed else "OPEN",
                    "question_type": "COLOR" if not q.closed else "PRES",
                    "question": q.question,
                    "phrase_type": "test_freeform" if split == "test" else "freeform",
                }
            )
    (folder / VQARAD_JSON).write_text(json.dumps(records))
    return folder


def write_pathvqa(folder: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """A PathVQA-style table per split: ``<split>.jsonl`` with image (relative path), question, answer."""

    def name_of(image: int, suffix: str) -> str:
        return f"images/{split}_{image}{suffix}"

    for split, items in split_questions(per_split, seed).items():
        write_images(folder, items, name_of, seed, suffix=".png")
        with (folder / f"{split}.jsonl").open("w") as out:
            for q in items:
                out.write(
                    json.dumps(
                        {"image": f"images/{split}_{q.image}.png", "question": q.question, "answer": q.answer}
                    )
                    + "\n"
                )
    return folder


def write_hub_folder(folder: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """A dataset folder as ``datasets.load_dataset`` reads a Hub repository: ``<split>.parquet`` with an
    image column of images (bytes), question, answer (as flaviagiammarino/vqa-rad has them)."""
    import datasets

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in split_questions(per_split, seed).items():
        images = {q.image: square(q.color, rng) for q in items}
        table = datasets.Dataset.from_dict(
            {
                "image": [images[q.image] for q in items],
                "question": [q.question for q in items],
                "answer": [q.answer for q in items],
            },
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "question": datasets.Value("string"),
                    "answer": datasets.Value("string"),
                }
            ),
        )
        table.to_parquet(str(folder / f"{split}.parquet"))
    return folder


# --------------------------------------------------------------------------- bad rows


def append_bad_slake_rows(folder: Path) -> dict[tuple[str, int], str]:
    """Append one bad row of each kind to SLAKE's train.json (and an unscorable answer to test.json);
    returns {(file, row): a fragment of the reason} for every one of them."""
    expected = {}
    train = folder / "train.json"
    records = json.loads(train.read_text())
    good = next(r for r in records if r["q_lang"] == "en")
    (folder / "imgs" / "broken").mkdir(parents=True, exist_ok=True)
    (folder / "imgs" / "broken" / "source.jpg").write_text("not an image")
    bad = [
        ({**good, "img_name": "missing/source.jpg"}, "does not exist"),
        ({**good, "img_name": "broken/source.jpg"}, "cannot be read as an image"),
        ({**good, "question": "   "}, "the question is empty"),
        ({**good, "answer": ""}, "the answer is empty"),
        ({**good, "answer_type": "MAYBE"}, "neither CLOSED nor OPEN"),
        ("not a record", "the row is a str, not an object"),
    ]
    for record, reason in bad:
        records.append(record)
        expected[(str(train), len(records))] = reason
    train.write_text(json.dumps(records, ensure_ascii=False))
    test = folder / "test.json"
    records = json.loads(test.read_text())
    records.append({**records[0], "answer": "purple", "q_lang": "en"})
    expected[(str(test), len(records))] = "answer 'purple' is not among the training answers"
    test.write_text(json.dumps(records, ensure_ascii=False))
    return expected
