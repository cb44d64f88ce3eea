"""FedBPT (Sun et al. 2023): federated black-box prompt tuning of an intrinsic prompt z by CMA-ES.

What travels each round, per client: down, the global z (d floats) and the step size σ the
clients start their local CMA-ES from (one float); up, the client's final local mean z_k
(d floats) and four floats: its loss L_k on its local training data, S_k = Σ_t σ_{k,t}² over
its local generations t, its number of parents μ_k, and its final local σ. Never an optimiser
object: the reference implementation pickles its whole CMA-ES (a d×d covariance, over 1 MB at
d = 500) into every downlink; this sends d + 1 floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from fedprompt.state import State, Update
from fedprompt.strategies.base import Strategy
from fedprompt.strategies.fedavg import weighted_mean
from optimizers.cma_update import STATE_NAMES, CMAState, cma_tell

FedBPTRule = Literal["cma", "mean"]

SIGMA = "sigma"
"""Downlink extra: the step size σ clients start their local CMA-ES from, shape [1]."""
LOSS, SIGMA_SQ_SUM, PARENTS, FINAL_SIGMA = "loss", "sigma_sq_sum", "parents", "final_sigma"
UPLINK_EXTRAS: dict[str, tuple[int, ...]] = {LOSS: (1,), SIGMA_SQ_SUM: (1,), PARENTS: (1,), FINAL_SIGMA: (1,)}
"""Uplink extras every client update carries: L_k, S_k = Σ_t σ_{k,t}², μ_k and the final local σ."""

_CMA_PREFIX = "cma/"


def global_sigma(sigma_sq_sums: torch.Tensor, parents: torch.Tensor) -> float:
    """FedBPT's step size for the global tell: σ_g = √( (1/K) Σ_k S_k / μ_k ).

    With every client's μ the same, this is the reference's √(Σ_k S_k / K / μ), where S_k sums
    the squared local σ over all of client k's generations of the round.
    """
    return math.sqrt(float((sigma_sq_sums.double() / parents.double()).mean()))


class FedBPT(Strategy):
    """The FedBPT server: owns the σ sent down, the rule, and (rule ``cma``) the global CMA-ES state.

    Rule ``cma`` (the reference implementation's): the server keeps one global CMA-ES over z whose
    mean is the global z. Each round, with K accepted clients:

    1. σ_g = √((1/K) Σ_k S_k/μ_k) from the clients' local step sizes (``global_sigma``);
    2. one tell of the K client means z_k with their local losses L_k, every one a parent
       (μ = λ = K, the reference's ``CMA_mu = popsize``), from σ_g (``optimizers.cma_update``);
       the new global z is the CMA-ES mean, Σ_i w_i z_{i:K} with w_i ∝ ln(K + 1/2) − ln i;
    3. σ sent down ← max(σ_floor, σ_down · min(1, σ_after/σ_g)): scaled by the global CMA-ES's
       step-size change, never increased and never below the floor. (The reference caps after
       flooring with the value it just floored, which undoes its own 0.5 floor; fedprompt applies
       the floor last, as the reference evidently intends.)

    Rule ``mean`` (the simpler comparison): the new global z is the example-weighted mean
    Σ_k n_k z_k / Σ_k n_k (FedAvg on z) and σ sent down ← max(σ_floor, min(σ_down, σ_rms)) with
    σ_rms = √(Σ_k n_k σ_k² / Σ_k n_k) over the clients' final local σ.

    Differences from the reference, on purpose: clients restart their local CMA-ES with C = I
    (the reference copies the global covariance down), and the global CMA-ES is this module's
    float64 implementation, checkpointed as tensors, instead of a pickled pycma object.
    """

    def __init__(self, initial_sigma: float, sigma_floor: float = 0.5, rule: FedBPTRule = "cma") -> None:
        if rule not in get_args(FedBPTRule):
            raise ValueError(f"FedBPT rule must be one of {list(get_args(FedBPTRule))}, got {rule!r}")
        for label, value in (("initial_sigma", initial_sigma), ("sigma_floor", sigma_floor)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"FedBPT {label} must be a positive number, got {value}")
        if sigma_floor > initial_sigma:
            raise ValueError(f"FedBPT sigma_floor ({sigma_floor}) exceeds initial_sigma ({initial_sigma})")
        self.initial_sigma = float(initial_sigma)
        self.sigma_floor = float(sigma_floor)
        self.rule = rule
        self.sigma = float(initial_sigma)
        self._cma: CMAState | None = None

    def downlink_extras(self) -> State:
        """The step size the sampled clients start from, as ``sigma`` [1]."""
        return {SIGMA: torch.tensor([self.sigma], dtype=torch.float32)}

    def uplink_extras(self) -> dict[str, tuple[int, ...]]:
        return dict(UPLINK_EXTRAS)

    def validate_update(self, update: Update) -> None:
        """Reject an update whose search report cannot be right: a negative loss (cross-entropy is
        never negative, and a lower loss would rank the client first), a step size or S_k that is
        not positive, or a parent count that is not a positive integer."""
        values = {name: float(t.reshape(-1)[0]) for name, t in update.extras.items() if t.numel() == 1}
        if set(values) != set(UPLINK_EXTRAS):
            raise ValueError(f"FedBPT needs the scalars {sorted(UPLINK_EXTRAS)}, got {sorted(update.extras)}")
        if values[LOSS] < 0:
            raise ValueError(f"loss is {values[LOSS]}, a cross-entropy is never negative")
        for name in (SIGMA_SQ_SUM, FINAL_SIGMA):
            if values[name] <= 0:
                raise ValueError(f"{name} is {values[name]}, expected a positive number")
        if values[PARENTS] < 1 or values[PARENTS] != int(values[PARENTS]):
            raise ValueError(f"parents is {values[PARENTS]}, expected a positive integer")

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        name = _vector_name(global_state)
        if self.rule == "mean":
            mean = weighted_mean(updates)[name]
            total = sum(u.num_examples for u in updates)
            rms = math.sqrt(sum(u.num_examples * float(u.extras[FINAL_SIGMA]) ** 2 for u in updates) / total)
            self.sigma = max(self.sigma_floor, min(self.sigma, rms))
            return {name: mean.to(torch.float32)}

        cma = self._cma if self._cma is not None else CMAState.initial(global_state[name], self.sigma)
        if not torch.allclose(cma.mean, global_state[name].double(), rtol=1e-5, atol=1e-6):
            raise ValueError(
                "the global CMA-ES mean differs from the global prompt state; restore the checkpoint that "
                "holds both, or start the strategy afresh"
            )
        solutions = torch.stack([u.state[name].double() for u in updates])
        losses = torch.cat([u.extras[LOSS].double().reshape(1) for u in updates])
        before = global_sigma(
            torch.cat([u.extras[SIGMA_SQ_SUM].reshape(1) for u in updates]),
            torch.cat([u.extras[PARENTS].reshape(1) for u in updates]),
        )
        told = cma_tell(cma.with_sigma(before), solutions, losses)
        self.sigma = max(self.sigma_floor, self.sigma * min(1.0, told.sigma / before))
        self._cma = told
        return {name: told.mean.to(torch.float32)}

    def state_dict(self) -> State:
        """``sigma`` (the step size sent down) and, after the first ``cma`` round, ``cma/<part>``."""
        out = {SIGMA: torch.tensor([self.sigma], dtype=torch.float64)}
        if self._cma is not None:
            out.update({_CMA_PREFIX + k: v for k, v in self._cma.to_tensors().items()})
        return out

    def load_state_dict(self, state: State) -> None:
        """Restore ``state_dict``'s output; an empty dict resets to the initial σ and no CMA-ES state."""
        if not state:
            self.sigma, self._cma = self.initial_sigma, None
            return
        unknown = sorted(k for k in state if k != SIGMA and not k.startswith(_CMA_PREFIX))
        if unknown or SIGMA not in state or state[SIGMA].numel() != 1:
            raise ValueError(
                f"FedBPT state holds {sorted(state)}; expected 'sigma' [1] and optionally "
                f"{[_CMA_PREFIX + n for n in STATE_NAMES]}"
            )
        sigma = float(state[SIGMA].reshape(-1)[0])
        if not (math.isfinite(sigma) and sigma >= self.sigma_floor):
            raise ValueError(
                f"FedBPT state sigma is {sigma}, expected a number >= sigma_floor {self.sigma_floor}"
            )
        parts = {k.removeprefix(_CMA_PREFIX): v for k, v in state.items() if k.startswith(_CMA_PREFIX)}
        if parts and self.rule != "cma":
            raise ValueError("FedBPT state holds a global CMA-ES, but this strategy's rule is 'mean'")
        self._cma = CMAState.from_tensors(parts) if parts else None
        self.sigma = sigma


def _vector_name(global_state: State) -> str:
    """The name of the one vector FedBPT searches (an intrinsic prompt's z)."""
    if len(global_state) != 1 or next(iter(global_state.values())).dim() != 1:
        shapes = {name: tuple(t.shape) for name, t in global_state.items()}
        raise ValueError(
            f"FedBPT searches one vector (an intrinsic prompt's z); the prompt state is {shapes}"
        )
    return next(iter(global_state))
