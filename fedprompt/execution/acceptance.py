"""The server's acceptance test of each new global prompt on a held-out set it keeps
(``federation.acceptance``): an aggregation stage that keeps the previous global prompt when the
candidate scores worse."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from fedprompt.federation.server import CandidateRejected, RoundRecord, Server
from fedprompt.federation.state import State
from fedprompt.tasks.experiment import Experiment
from fedprompt.training.gradient import evaluate

log = logging.getLogger("fedprompt.acceptance")

SCORE = "score"


class HeldOutAcceptance:
    """Owns the acceptance rule and the held-out score of the current global prompt.

    After the strategy (and any stage before this one), the candidate global prompt is scored on
    the experiment's ``acceptance_data``; it is accepted when its score is no worse than the current
    global prompt's by more than ``tolerance`` (loss: s_new ≤ s_old + tolerance; accuracy:
    s_new ≥ s_old − tolerance), and otherwise refused with ``CandidateRejected``, which skips the
    round and restores every piece of server state. The current prompt's score is kept (and
    checkpointed), so each round scores one prompt; it is computed the first time it is needed.
    Each round reports ``acceptance_score`` (the global prompt's after the round),
    ``acceptance_candidate_score`` and ``acceptance_accepted`` (1 or 0).
    """

    name = "acceptance"
    runs_without_updates = False

    def __init__(
        self,
        experiment: Experiment,
        score: Literal["loss", "accuracy"],
        tolerance: float,
        batch_size: int,
    ) -> None:
        if experiment.acceptance_data is None or len(experiment.acceptance_data) == 0:
            raise ValueError("held-out acceptance needs the experiment's acceptance_data")
        self.experiment = experiment
        self.score = score
        self.tolerance = float(tolerance)
        self.batch_size = batch_size
        self.current: float | None = None

    def begin_round(self, server: Server, record: RoundRecord) -> None:
        """Nothing to set before the updates arrive."""

    def apply(self, server: Server, record: RoundRecord, previous: State, aggregated: State) -> State:
        if self.current is None:
            self.current = self._score(previous)
        candidate = self._score(aggregated)
        accepted = self._no_worse(candidate, self.current)
        record.stage_metrics.update(
            {
                "acceptance_candidate_score": candidate,
                "acceptance_score": candidate if accepted else self.current,
                "acceptance_accepted": int(accepted),
            }
        )
        if not accepted:
            raise CandidateRejected(
                f"held-out {self.score} of the new global prompt is {candidate:.6g} against "
                f"{self.current:.6g} for the current one (tolerance {self.tolerance:g})"
            )
        self.current = candidate
        return aggregated

    def state_dict(self) -> State:
        """``score``: the current global prompt's held-out score, once computed."""
        return {} if self.current is None else {SCORE: torch.tensor([self.current], dtype=torch.float64)}

    def load_state_dict(self, state: State) -> None:
        if not state:
            self.current = None
            return
        if set(state) != {SCORE} or state[SCORE].numel() != 1:
            raise ValueError(f"acceptance state holds {sorted(state)}; expected '{SCORE}' [1]")
        value = float(state[SCORE].reshape(-1)[0])
        if not math.isfinite(value):
            raise ValueError(f"acceptance state score is {value}, expected a finite number")
        self.current = value

    def _no_worse(self, candidate: float, current: float) -> bool:
        if self.score == "loss":
            return candidate <= current + self.tolerance
        return candidate >= current - self.tolerance

    def _score(self, state: State) -> float:
        experiment = self.experiment
        experiment.model.load_state_dict(experiment.full_state(state), strict=True)
        metrics = evaluate(experiment.model, experiment.acceptance_data, self.batch_size, experiment.device)
        return float(metrics[self.score])
