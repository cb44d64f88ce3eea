"""What every local optimiser returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OptimizationStats:
    """What one local optimisation did: steps taken, examples seen, model queries, losses, and
    any tensors it produced beyond the parameters (e.g. a CMA-ES population and its losses)."""

    steps: int = 0
    examples: int = 0
    queries: int = 0
    mean_loss: float = float("nan")
    final_loss: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient_scale: float | None = None
    """How far a constant unit gradient would have moved the parameters (SGD: Σ_k η_k(1 − β^(k+1))/(1 − β));
    None where the step is not linear in the gradient (AdamW, black-box search) or differs by group."""
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The local optimiser's own state at the end of the run (AdamW's moments and step counts, SGD's
    momentum buffers) when it was asked to keep it: what its next run resumes from, never sent."""

    def as_metrics(self) -> dict[str, float]:
        return {
            "steps": float(self.steps),
            "examples_seen": float(self.examples),
            "queries": float(self.queries),
            "train_loss": self.mean_loss,
            "final_loss": self.final_loss,
            **self.extra,
        }


def checked_losses(losses: torch.Tensor, count: int, where: str) -> torch.Tensor:
    """A population loss's answer for ``count`` candidates as a float64 CPU vector, or an error
    saying what is wrong with it (``where``: the generation or step, for the message)."""
    if not isinstance(losses, torch.Tensor) or losses.shape != (count,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"the population loss returned {shape} at {where}, expected ({count},)")
    losses = losses.detach().to("cpu", torch.float64)
    bad = int((~torch.isfinite(losses)).sum())
    if bad:
        raise FloatingPointError(f"{bad} of {count} candidate losses are not finite at {where}")
    return losses
