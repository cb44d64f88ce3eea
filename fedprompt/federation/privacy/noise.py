"""Where differential privacy's Gaussian noise comes from (``privacy.noise_seed``).

``system`` (the default): the operating system's CSPRNG through Box–Muller in float64
(``fedprompt.federation.randomness``); no one can reproduce it, the party that draws it included,
so nobody holding the configuration can subtract it. ``reproducible-insecure``: a torch generator
seeded from a seed and a purpose (``fedprompt.seeding.derive_seed``), so runs and resumes are
bit-identical; anyone who holds that seed (every site has the run seed in its configuration, and a
local-DP client gets its round seed from the server) can subtract the noise, so the guarantee
does not hold against them. It exists for simulations, is refused on Flower, and a run that uses
it says so in its summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

import torch

from fedprompt.federation.randomness import system_normal
from fedprompt.seeding import derive_seed, torch_generator

SYSTEM = "system"
REPRODUCIBLE = "reproducible-insecure"
NoiseMode = Literal["system", "reproducible-insecure"]
REPRODUCIBLE_WARNING = (
    "privacy.noise_seed is reproducible-insecure: the noise (and, under central DP, the client sample) "
    "derive from the configuration's seed, so this run's epsilon does not hold against anyone who "
    "holds its configuration (every site does); a simulation setting, never a deployment's"
)
"""What a run with reproducible noise logs at its start and writes in its summary."""


class NoiseSource(Protocol):
    """Draws the standard normals of one release: one float64 tensor per name, names in sorted order."""

    def normal(self, shapes: Mapping[str, tuple[int, ...]], *purpose: str | int) -> dict[str, torch.Tensor]:
        """Standard normal tensors of ``shapes`` for the release named by ``purpose`` (e.g.
        ``"dp-noise", round``)."""


class SystemNoise:
    """Standard normals from the operating system's CSPRNG; ``purpose`` only names the release."""

    mode: NoiseMode = SYSTEM

    def normal(self, shapes: Mapping[str, tuple[int, ...]], *purpose: str | int) -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(shapes):
            shape = tuple(shapes[name])
            count = int(torch.Size(shape).numel())
            out[name] = torch.from_numpy(system_normal(count)).reshape(shape)
        return out


class SeededNoise:
    """Standard normals from a torch generator seeded by ``derive_seed(seed, *purpose)``: the same
    seed and purpose give the same noise (reproducible, and so subtractable by the seed's holders)."""

    mode: NoiseMode = REPRODUCIBLE

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def normal(self, shapes: Mapping[str, tuple[int, ...]], *purpose: str | int) -> dict[str, torch.Tensor]:
        generator = torch_generator(derive_seed(self.seed, *purpose))
        return {
            name: torch.randn(tuple(shapes[name]), generator=generator, dtype=torch.float64)
            for name in sorted(shapes)
        }


def noise_source(mode: NoiseMode, seed: int) -> NoiseSource:
    """The noise source of ``privacy.noise_seed``; ``seed`` is used by the reproducible mode only."""
    if mode == SYSTEM:
        return SystemNoise()
    if mode == REPRODUCIBLE:
        return SeededNoise(seed)
    raise ValueError(f"unknown noise mode {mode!r}; expected {SYSTEM!r} or {REPRODUCIBLE!r}")
