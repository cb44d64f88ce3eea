"""What every local optimiser returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimizationStats:
    """What one local optimisation did: steps taken, examples seen, model queries, losses."""

    steps: int = 0
    examples: int = 0
    queries: int = 0
    mean_loss: float = float("nan")
    final_loss: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        return {
            "steps": float(self.steps),
            "examples_seen": float(self.examples),
            "queries": float(self.queries),
            "train_loss": self.mean_loss,
            "final_loss": self.final_loss,
            **self.extra,
        }
