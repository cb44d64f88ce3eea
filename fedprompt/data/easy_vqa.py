"""easy-vqa: the VQA set the ``easy-vqa`` package ships (64×64 images of one coloured shape on a light
background; 38,575 train and 9,673 test questions over 4,000 and 1,000 images; 13 answers), read
offline from the package's files.

Question types follow the answer: ``yes/no`` (closed), ``shape`` (circle, rectangle, triangle) and
``color`` (the eight colours). Each image's ``shape`` and ``color`` are what its own questions and
answers state ("what is the blue shape?" -> circle: a blue circle; "is there not a red shape?" -> no:
red); for the few images whose questions state neither, they are read from the pixels (the shape's
fill of its bounding box: rectangle ~1, circle ~π/4, triangle ~1/2; the named colour nearest the
shape's core), a rule that gives the stated answer of all 12,705 "what shape/colour" questions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from fedprompt.data.vqa_rows import RawRow
from fedprompt.errors import DataError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "green": (0, 255, 0),
    "red": (255, 0, 0),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShapeImage:
    """One easy-vqa image: its file, and the shape and colour it shows."""

    path: str
    shape: str
    color: str


@dataclass(frozen=True)
class EasyVQAQuestions:
    """One split's questions as the package stores them (parallel lists) and its image files by id."""

    file: str
    questions: list[str]
    answers: list[str]
    image_ids: list[int]
    image_paths: dict[int, str]


def question_type(answer: str) -> str:
    """yes/no, shape or color: easy-vqa's question types, told apart by their answers."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


@lru_cache(maxsize=2)
def read_split(split: str) -> EasyVQAQuestions:
    """The package's questions and image paths of ``split`` (train or test)."""
    if split not in SPLITS:
        raise DataError(f"easy-vqa has the splits {list(SPLITS)}, not {split!r}")
    try:
        import easy_vqa
    except ModuleNotFoundError as exc:
        raise DataError("format easy-vqa needs the easy-vqa package: pip install easy-vqa") from exc
    reader = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    paths = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    questions, answers, image_ids = reader()
    file = str(Path(easy_vqa.__file__).parent / "data" / split / "questions.json")
    return EasyVQAQuestions(file, list(questions), list(answers), [int(i) for i in image_ids], paths())


@lru_cache(maxsize=2)
def shape_images(split: str) -> dict[int, ShapeImage]:
    """Every image of ``split`` by id, with its shape and colour (stated by its questions, else read
    from its pixels)."""
    data = read_split(split)
    stated: dict[int, dict[str, str]] = {}
    for question, answer, image_id in zip(data.questions, data.answers, data.image_ids, strict=True):
        for kind, value in _stated_attributes(question, answer).items():
            stated.setdefault(image_id, {})[kind] = value
    images = {}
    for image_id, path in sorted(data.image_paths.items()):
        known = stated.get(image_id, {})
        if "shape" not in known or "color" not in known:
            seen = pixel_attributes(path)
            known = {**seen, **known}
        images[image_id] = ShapeImage(path, known["shape"], known["color"])
    return images


def _stated_attributes(question: str, answer: str) -> dict[str, str]:
    """What one question and its answer say about the image: its shape and/or colour."""
    words = re.findall(r"[a-z]+", question.lower())
    named = {"shape": [w for w in words if w in SHAPES], "color": [w for w in words if w in COLORS]}
    found: dict[str, str] = {}
    if answer in SHAPES:
        found["shape"] = answer
    elif answer in COLORS:
        found["color"] = answer
    negated = "not" in words or "no" in words
    present = answer not in ("yes", "no") or (answer == "yes") != negated
    if present:
        for kind, names in named.items():
            if len(names) == 1 and kind not in found:
                found[kind] = names[0]
    return found


def pixel_attributes(path: str) -> dict[str, str]:
    """Shape and colour read from an image: the pixels far from the background's (median border)
    colour are the shape; its fill of its bounding box gives the shape, and the named colour
    nearest the mean of its core (the pixels farthest from the background) its colour."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).sum(-1)
    mask = distance > 60
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise DataError(f"easy-vqa image {path!r} shows no shape")
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "rectangle" if fill > 0.915 else "circle" if fill > 0.71 else "triangle"
    mean = pixels[distance >= 0.9 * distance.max()].mean(0)  # the core: edges blend into the background
    color = min(COLORS, key=lambda name: float(((mean - np.array(COLORS[name])) ** 2).sum()))
    return {"shape": shape, "color": color}


def easy_vqa_rows(split: str) -> Iterator[RawRow]:
    """The questions of ``split`` as VQA rows (rows count from 1 in the package's questions.json)."""
    data = read_split(split)
    images = shape_images(split)
    for number, (question, answer, image_id) in enumerate(
        zip(data.questions, data.answers, data.image_ids, strict=True), start=1
    ):
        image = images.get(image_id)
        yield RawRow(
            data.file,
            number,
            image.path if image else None,
            question,
            answer,
            None,
            question_type(answer),
            {"shape": image.shape, "color": image.color} if image else {},
        )
