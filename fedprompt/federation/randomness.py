"""The operating system's randomness, for what must not be reproducible from the configuration:
differential privacy's noise and the client sample its accountant assumes.

Every other random choice of a run derives from the run seed (``fedprompt.seeding``), which every
site holds in its configuration; noise drawn from it can be subtracted by anyone who has the
configuration. What this module draws comes from ``os.urandom`` (the kernel's CSPRNG: getrandom(2)
on Linux), never from a seeded generator such as MT19937 or PCG64.

Construction:

- **uniform doubles** in the open interval (0, 1): 8 bytes of ``os.urandom`` give a 64-bit word; its
  top 53 bits k give u = (k + 1/2) / 2^53, so u is never 0 or 1 and every value is an exact double;
- **standard normals** by the Box–Muller transform in float64: from two uniforms u1, u2,
  z1 = √(−2 ln u1) cos(2π u2) and z2 = √(−2 ln u1) sin(2π u2) are independent N(0, 1). The smallest
  u1 is 2^−54, so |z| ≤ √(108 ln 2) ≈ 8.65: the tail beyond 8.65σ (probability 8e-18) is cut.

``tests/test_randomness.py`` checks the first four moments and the distribution (Kolmogorov–Smirnov)
of what it draws, and that two draws never agree.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence

import numpy as np

_MANTISSA_BITS = 53


def system_uniform(count: int) -> np.ndarray:
    """``count`` independent uniform doubles in (0, 1) from the operating system's CSPRNG."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    words = np.frombuffer(os.urandom(8 * count), dtype="<u8") >> np.uint64(64 - _MANTISSA_BITS)
    return (words.astype(np.float64) + 0.5) * 2.0**-_MANTISSA_BITS


def system_normal(count: int) -> np.ndarray:
    """``count`` independent standard normal doubles (Box–Muller on :func:`system_uniform`)."""
    pairs = (count + 1) // 2
    radius = np.sqrt(-2.0 * np.log(system_uniform(pairs)))
    angle = (2.0 * math.pi) * system_uniform(pairs)
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = radius * np.cos(angle)
    out[1::2] = radius * np.sin(angle)
    return out[:count]


def system_sample(ids: Sequence[int], count: int) -> list[int]:
    """``count`` distinct ids drawn uniformly without replacement by the operating system's CSPRNG,
    sorted."""
    return sorted(secrets.SystemRandom().sample(list(ids), count))
