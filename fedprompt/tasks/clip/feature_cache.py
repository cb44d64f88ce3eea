"""Prompt-independent image inputs (CLIP features, hidden states below the first prompted layer),
computed once and kept in memory, and on disk as safetensors when a folder is given.

A cache entry is keyed by everything its values depend on: the model's name and architecture, its
weights (pretrained tag, checkpoint file hash or random seed), the precision, the image transform,
what is stored (features, or hidden states at the input of layer k), and a fingerprint of the
images themselves. Files are safetensors (never pickle); a file that does not load is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import datasets
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("fedprompt.feature_cache")

VALUES = "values"


def image_fingerprint(dataset: datasets.Dataset, column: str = "image") -> str:
    """SHA-256 over the stored bytes of every image of ``dataset`` (read from the file when only a
    path is stored), in row order, without decoding them."""
    digest = hashlib.sha256()
    raw = dataset.cast_column(column, datasets.Image(decode=False))
    for start in range(0, len(raw), 1024):
        for item in raw[start : start + 1024][column]:
            if item.get("bytes") is not None:
                data = item["bytes"]
            elif item.get("path"):
                data = Path(item["path"]).read_bytes()
            else:
                raise ValueError("an image has neither bytes nor a path; cannot fingerprint it")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


class FeatureCache:
    """Owns cached tensors: a dict in memory for the process, safetensors files in ``directory``.

    ``get(key_parts, compute)`` returns the tensor for that key, computing it (once) on a miss;
    ``persist=False`` keeps an entry out of the folder (e.g. preprocessed pixels, cheap to redo).
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(parts: Mapping[str, str]) -> str:
        """A stable hex key for a mapping of strings (order does not matter)."""
        return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()

    def path(self, parts: Mapping[str, str]) -> Path | None:
        return self.directory / f"{self.key(parts)}.safetensors" if self.directory is not None else None

    def get(
        self, parts: Mapping[str, str], compute: Callable[[], torch.Tensor], persist: bool = True
    ) -> torch.Tensor:
        key = self.key(parts)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        value = self._read(parts) if persist else None
        if value is None:
            self.misses += 1
            value = compute().detach().cpu().contiguous()
            if persist:
                self._write(parts, value)
        else:
            self.hits += 1
        self._memory[key] = value
        return value

    def _read(self, parts: Mapping[str, str]) -> torch.Tensor | None:
        path = self.path(parts)
        if path is None or not path.is_file():
            return None
        try:
            return load_file(str(path))[VALUES]
        except (SafetensorError, KeyError, OSError) as exc:
            log.warning("feature cache file %s is unreadable (%s); recomputing it", path, exc)
            return None

    def _write(self, parts: Mapping[str, str], value: torch.Tensor) -> None:
        path = self.path(parts)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file({VALUES: value}, str(partial), metadata={k: str(v) for k, v in parts.items()})
        partial.replace(path)  # atomic: a reader never sees half a file
