"""Every random choice of a run derives from the one run seed, by a stable path of names."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(run_seed: int, *path: str | int) -> int:
    """A 63-bit seed for one purpose, e.g. ``derive_seed(s, "client-train", cid, round)``.

    Stable across processes and Python versions (no ``hash()``), and independent for distinct paths.
    """
    words = [run_seed]
    for part in path:
        words.append(zlib.crc32(part.encode()) if isinstance(part, str) else int(part))
    high, low = (int(w) for w in np.random.SeedSequence(words).generate_state(2, dtype=np.uint32))
    return (high << 31) | (low >> 1)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (CPU so that streams match on every device)."""
    return torch.Generator().manual_seed(seed)
