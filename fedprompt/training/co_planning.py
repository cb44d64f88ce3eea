"""FeS's co-planning of training depth and pseudo-label capacity (Cai et al., "Federated Few-Shot
Learning for Mobile NLP", MobiCom 2023), as it applies to a deep prompt.

Each round a client picks one candidate (depth d, capacity c) of the configured grid: the top d of
the prompt's layers train (the rest are held), and the round admits pseudo-labels at pace c. The
criterion is the paper's: accuracy gained per unit of compute spent. A client measures both itself:

- the gain of a round is the rise of its *score* from that round to the next one it takes part in,
  the score being the received global prompt's soft accuracy (mean probability of the true label)
  on the client's labelled examples;
- the cost of a round is the transformer-layer passes it ran: one per layer an example's forward
  pass runs through (annotation of the unlabelled candidates, the score, training) and two per
  layer its backward pass runs through (training; it stops at the lowest trained layer).

The client first tries every candidate once, in grid order (profiling); from then on it takes the
candidate whose last try had the highest gain per unit of cost, ties going to the earlier one.
Everything here is a pure function of the client's records, which it carries as client state
(checkpointed and resumed with it, never sent): the same records give the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedprompt.config import CoPlanningConfig
from fedprompt.federation.state import State

PREFIX = "co_plan/"
"""Carried-state prefix of the planner's records."""


@dataclass(frozen=True)
class Plan:
    """One candidate of the grid: how many top layers train, and the pace of pseudo-labels."""

    depth: int
    capacity: float


def candidates(config: CoPlanningConfig) -> list[Plan]:
    """The grid, depths outer and capacities inner, in the configured orders."""
    return [Plan(d, c) for d in config.depths for c in config.capacities]


def layer_passes(forward_only: int, trained: int, forward_layers: int, backward_layers: int) -> float:
    """The compute of a round in transformer-layer passes: ``forward_only`` example passes without a
    backward pass (annotation, scoring) through ``forward_layers`` layers each, and ``trained``
    example passes of training, each a forward pass through ``forward_layers`` layers and a backward
    pass, counted twice, through ``backward_layers``."""
    return float(forward_only * forward_layers + trained * (forward_layers + 2 * backward_layers))


@dataclass
class PlannerRecords:
    """What a client's planner knows: for each candidate, the gain per unit of cost its last try
    achieved (None: not tried yet), and the round in flight: which candidate it ran (−1: none), the
    score it started from and the compute it spent."""

    ratios: list[float | None]
    last: int = -1
    last_score: float = 0.0
    last_cost: float = 0.0

    @classmethod
    def fresh(cls, count: int) -> PlannerRecords:
        return cls([None] * count)

    def observe(self, score: float) -> float | None:
        """Credit the candidate in flight with the gain ``score − last_score`` per unit of its cost;
        return the gain (None when nothing was in flight)."""
        if self.last < 0:
            return None
        gain = score - self.last_score
        self.ratios[self.last] = gain / self.last_cost
        return gain

    def choose(self) -> int:
        """The first untried candidate; once all were tried, the highest ratio (the earliest of equals)."""
        untried = [index for index, ratio in enumerate(self.ratios) if ratio is None]
        if untried:
            return untried[0]
        return max(range(len(self.ratios)), key=lambda i: (self.ratios[i], -i))

    def begin(self, index: int, score: float, cost: float) -> None:
        """Put candidate ``index`` in flight, started from ``score``, having spent ``cost``."""
        if cost <= 0:
            raise ValueError(f"a round's cost must be positive, got {cost}")
        self.last, self.last_score, self.last_cost = index, score, cost

    def to_state(self) -> State:
        """The records as carried state (float64, so a resumed planner compares the same numbers;
        ``tried`` 1 where a candidate has a ratio, whose entry is 0 otherwise)."""
        return {
            PREFIX + "ratios": torch.tensor([r or 0.0 for r in self.ratios], dtype=torch.float64),
            PREFIX + "tried": torch.tensor([r is not None for r in self.ratios], dtype=torch.float64),
            PREFIX + "last": torch.tensor([self.last, self.last_score, self.last_cost], dtype=torch.float64),
        }

    @classmethod
    def from_state(cls, carried: State, count: int) -> PlannerRecords:
        """The records a client carried (fresh ones when it carries none), checked against a grid of
        ``count`` candidates."""
        parts = [carried.get(PREFIX + name) for name in ("ratios", "tried", "last")]
        if all(part is None for part in parts):
            return cls.fresh(count)
        ratios, tried, last = parts
        if (
            ratios is None
            or tried is None
            or last is None
            or ratios.shape != (count,)
            or tried.shape != (count,)
            or last.shape != (3,)
        ):
            raise ValueError(
                f"the carried co-planner records do not fit a grid of {count} candidates; resume with the "
                "co_planning grid the run started with"
            )
        index, score, cost = (float(v) for v in last.to(torch.float64))
        if index != int(index) or not -1 <= index < count:
            raise ValueError(f"the carried co-planner records name candidate {index} of {count}")
        kept = [float(r) if bool(t) else None for r, t in zip(ratios.to(torch.float64), tried, strict=True)]
        return cls(kept, int(index), score, cost)
