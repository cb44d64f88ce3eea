"""Learning-rate schedules over rounds: the factor of the base learning rate a round's steps use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

ScheduleKind = Literal["constant", "step", "exponential", "cosine"]
WarmupKind = Literal["constant", "linear"]


@dataclass(frozen=True)
class RoundSchedule:
    """Owns the rule that maps a round (counted from 1) to a factor of the base learning rate.

    A pure function of the round: every client of a round, a resumed run and a Flower site compute
    the same factor, and it is constant within a round (as Dassl, which CoOp and FedTPG train
    with, steps its scheduler once per epoch). With ``t = round − 1``:

    - warmup, ``t < warmup_rounds``: ``warmup_factor`` (constant, CoOp's 1e-5/0.002), or
      ``warmup_factor + (1 − warmup_factor)·t/warmup_rounds`` (linear);
    - after it, with ``s = t − warmup_rounds`` (the decay restarts its count after the warmup, as
      Dassl's default ``WARMUP_RECOUNT``):
      constant 1; step ``gamma^⌊s/step_rounds⌋``; exponential ``gamma^s``;
      cosine ``min_factor + (1 − min_factor)·(1 + cos(π·min(s, horizon)/horizon))/2`` (torch's
      CosineAnnealingLR over ``horizon`` rounds, held at its floor past the horizon).
    """

    kind: ScheduleKind = "constant"
    horizon: int = 1
    gamma: float = 0.1
    step_rounds: int = 1
    min_factor: float = 0.0
    warmup_rounds: int = 0
    warmup: WarmupKind = "constant"
    warmup_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in get_args(ScheduleKind):
            raise ValueError(
                f"schedule kind must be one of {list(get_args(ScheduleKind))}, got {self.kind!r}"
            )
        if self.warmup not in get_args(WarmupKind):
            raise ValueError(f"warmup must be one of {list(get_args(WarmupKind))}, got {self.warmup!r}")
        if self.horizon < 1 or self.step_rounds < 1 or self.warmup_rounds < 0:
            raise ValueError(
                f"horizon and step_rounds must be >= 1 and warmup_rounds >= 0, got {self.horizon}, "
                f"{self.step_rounds}, {self.warmup_rounds}"
            )
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.min_factor <= 1:
            raise ValueError(f"min_factor must be in [0, 1], got {self.min_factor}")
        if not self.warmup_factor >= 0:
            raise ValueError(f"warmup_factor must be >= 0, got {self.warmup_factor}")

    def factor(self, round_num: int) -> float:
        """The factor of the base learning rate every step of round ``round_num`` uses."""
        if round_num < 1:
            raise ValueError(f"rounds count from 1, got round {round_num}")
        t = round_num - 1
        if t < self.warmup_rounds:
            if self.warmup == "constant":
                return self.warmup_factor
            return self.warmup_factor + (1 - self.warmup_factor) * t / self.warmup_rounds
        s = t - self.warmup_rounds
        if self.kind == "step":
            return self.gamma ** (s // self.step_rounds)
        if self.kind == "exponential":
            return self.gamma**s
        if self.kind == "cosine":
            progress = min(s, self.horizon) / self.horizon
            return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * progress)) / 2
        return 1.0
