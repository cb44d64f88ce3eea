"""Durable files: atomic replacement and fsynced appends, and JSON-lines that survive a torn write."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("fedprompt.files")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` to a temporary file, fsync it, and rename it into
    place (then fsync the folder), so a crash leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    """``write_atomically`` for a text file."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def append_json_lines(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append one JSON object a line and fsync before returning."""
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
        out.flush()
        os.fsync(out.fileno())


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a JSON-lines file. A last line without its newline that is not JSON
    (a crash mid-append) is skipped with a warning; a bad line anywhere else is an error (the file
    was edited or damaged)."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")  # the last item is "" when the file ends with a newline
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: ignoring a torn last line (%d characters)", path, len(line))
                continue
            raise ValueError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def rewrite_json_lines(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace a JSON-lines file with ``rows``, atomically."""
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
