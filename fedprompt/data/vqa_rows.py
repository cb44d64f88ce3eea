"""A question as a VQA format's reader yields it, before it is checked: what every reader (the
public formats in ``data.vqa``, the easy-vqa package in ``data.easy_vqa``) makes and the checks
in ``data.vqa`` take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawRow:
    """One question as a format reader yields it, before it is checked."""

    file: str
    row: int
    image: Any  # a path (str or Path), a PIL image, or {"bytes": ..., "path": ...}; None when absent
    question: Any
    answer: Any
    answer_type: Any = None
    question_type: Any = None
    fields: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # set by a reader that cannot read the row at all


def unreadable_row(file: str, row: int, record: Any) -> RawRow:
    """A row that is not a JSON object of fields."""
    return RawRow(file, row, None, None, None, problem=f"the row is a {type(record).__name__}, not an object")
