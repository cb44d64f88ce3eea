"""FedBPT (Sun et al. 2023): federated black-box prompt tuning of an intrinsic prompt z by CMA-ES.

What travels each round, per client: down, the global z (d floats) and the step size σ the
clients start their local CMA-ES from (one float); up, the client's final local mean z_k
(d floats) and four floats: its loss L_k on its local training data, S_k = Σ_t σ_{k,t}² over
its local generations t, its number of parents μ_k, and its final local σ. Never an optimiser
object: the reference implementation pickles its whole CMA-ES (a d×d covariance, over 1 MB at
d = 500) into every downlink; this sends d + 1 floats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fedavg import weighted_mean
from optimizers.cma_update import STATE_NAMES, CMAState, cma_tell, repair_injected, repair_length

log = logging.getLogger("fedprompt.strategies.fedbpt")

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

    Rule ``cma`` (the reference implementation's, NVFlare ``research/fed-bpt`` ``GlobalES``): the
    server keeps one global CMA-ES over z whose mean is the global z. Each round, with K accepted
    clients:

    1. σ_g = √((1/K) Σ_k S_k/μ_k) from the clients' local step sizes (``global_sigma``);
    2. the K client means z_k are injected solutions, which the global CMA-ES never sampled: as
       pycma does in ``tell``, each one whose Mahalanobis distance ‖C^{-1/2}(z_k − m)‖/σ_g exceeds
       √d + 2d/(d + 2) is moved towards m to that distance (``repair_injected``; logged);
    3. one tell of the repaired means with their local losses L_k, every one a parent (μ = λ = K,
       the reference's ``CMA_mu = popsize``), from σ_g (``optimizers.cma_update``); the new global z
       is the CMA-ES mean, Σ_i w_i z_{i:K} with w_i ∝ ln(K + 1/2) − ln i;
    4. σ sent down ← max(σ_floor, σ_down · σ_after/σ_g): scaled by the global CMA-ES's step-size
       change, as the reference does, without a cap (the σ may grow when CMA-ES's path is long).
       The reference sets the floor 0.5 and on its next line undoes it (it caps the σ at the value
       it just floored); fedprompt applies the floor, as the reference evidently intends, and
       ``sigma_floor = 0`` gives the reference's effective rule.

    A σ schedule on top of either rule (``sigma_decay`` δ ≤ 1): the σ the rule gives is multiplied
    by δ each aggregated round before the floor, σ ← max(σ_floor, δ · σ_rule); δ = 1 is the
    reference's. A skipped round (no update, a refused candidate) leaves σ as it was.

    Rule ``mean`` (the simpler comparison): the new global z is the example-weighted mean
    Σ_k n_k z_k / Σ_k n_k (FedAvg on z) and σ sent down ← max(σ_floor, min(σ_down, σ_rms)) with
    σ_rms = √(Σ_k n_k σ_k² / Σ_k n_k) over the clients' final local σ.

    What the server accepts (``validate_update``, before aggregation): a finite z; a loss in
    [0, max_loss]; a final σ and an RMS step √(S_k/μ_k) within a factor ``max_sigma_ratio`` of the σ
    sent down; a positive integer μ_k. A round whose global update is still not finite (it cannot
    be, after these bounds and the repair; this is the last guard) leaves the global z and the
    search state as they were, with a logged reason.

    Differences from the reference, on purpose: clients restart their local CMA-ES with C = I
    (the reference copies the global covariance down), and the global CMA-ES is this module's
    float64 implementation, checkpointed as tensors, instead of a pickled pycma object.
    """

    def __init__(
        self,
        initial_sigma: float,
        sigma_floor: float = 0.5,
        rule: FedBPTRule = "cma",
        max_loss: float = 100.0,
        max_sigma_ratio: float = 10.0,
        sigma_decay: float = 1.0,
    ) -> None:
        if rule not in get_args(FedBPTRule):
            raise ValueError(f"FedBPT rule must be one of {list(get_args(FedBPTRule))}, got {rule!r}")
        for label, value in (("initial_sigma", initial_sigma), ("max_loss", max_loss)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"FedBPT {label} must be a positive number, got {value}")
        if not (math.isfinite(sigma_floor) and sigma_floor >= 0):
            raise ValueError(f"FedBPT sigma_floor must be a number >= 0, got {sigma_floor}")
        if not (math.isfinite(max_sigma_ratio) and max_sigma_ratio > 1):
            raise ValueError(f"FedBPT max_sigma_ratio must be a number > 1, got {max_sigma_ratio}")
        if not (math.isfinite(sigma_decay) and 0 < sigma_decay <= 1):
            raise ValueError(f"FedBPT sigma_decay must be in (0, 1], got {sigma_decay}")
        if sigma_floor > initial_sigma:
            raise ValueError(f"FedBPT sigma_floor ({sigma_floor}) exceeds initial_sigma ({initial_sigma})")
        self.initial_sigma = float(initial_sigma)
        self.sigma_floor = float(sigma_floor)
        self.rule = rule
        self.max_loss = float(max_loss)
        self.max_sigma_ratio = float(max_sigma_ratio)
        self.sigma_decay = float(sigma_decay)
        self.sigma = float(initial_sigma)
        self._cma: CMAState | None = None

    def downlink_extras(self) -> State:
        """The step size the sampled clients start from, as ``sigma`` [1]."""
        return {SIGMA: torch.tensor([self.sigma], dtype=torch.float32)}

    def uplink_extras(self) -> dict[str, tuple[int, ...]]:
        return dict(UPLINK_EXTRAS)

    def validate_update(self, update: Update) -> None:
        """Reject an update whose search report the server cannot use safely: a z that is not finite;
        a loss outside [0, max_loss] (a cross-entropy is never negative, and a lower loss ranks the
        client first); a final σ or RMS step √(S_k/μ_k) not within a factor ``max_sigma_ratio`` of the
        σ this round sent down (σ_g, set from them, scales what the global CMA-ES accepts); a parent
        count that is not a positive integer."""
        values = {name: float(t.reshape(-1)[0]) for name, t in update.extras.items() if t.numel() == 1}
        if set(values) != set(UPLINK_EXTRAS):
            raise ValueError(f"FedBPT needs the scalars {sorted(UPLINK_EXTRAS)}, got {sorted(update.extras)}")
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        bad += [name for name, t in update.state.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"{sorted(bad)} hold non-finite values")
        if not 0 <= values[LOSS] <= self.max_loss:
            raise ValueError(
                f"loss is {values[LOSS]}, expected a cross-entropy in [0, {self.max_loss}] "
                "(strategy.max_loss)"
            )
        if values[PARENTS] < 1 or values[PARENTS] != int(values[PARENTS]):
            raise ValueError(f"parents is {values[PARENTS]}, expected a positive integer")
        if values[SIGMA_SQ_SUM] <= 0:
            raise ValueError(f"{SIGMA_SQ_SUM} is {values[SIGMA_SQ_SUM]}, expected a positive number")
        low, high = self.sigma / self.max_sigma_ratio, self.sigma * self.max_sigma_ratio
        steps = {
            FINAL_SIGMA: values[FINAL_SIGMA],
            f"√({SIGMA_SQ_SUM}/{PARENTS})": math.sqrt(values[SIGMA_SQ_SUM] / values[PARENTS]),
        }
        for name, value in steps.items():
            if not low <= value <= high:
                raise ValueError(
                    f"{name} is {value:.6g}, outside [{low:.6g}, {high:.6g}]: within a factor "
                    f"{self.max_sigma_ratio:g} (strategy.max_sigma_ratio) of the σ {self.sigma:.6g} sent down"
                )

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        name = _vector_name(global_state)
        if self.rule == "mean":
            mean = weighted_mean(updates)[name]
            total = sum(u.num_examples for u in updates)
            rms = math.sqrt(sum(u.num_examples * float(u.extras[FINAL_SIGMA]) ** 2 for u in updates) / total)
            self.sigma = max(self.sigma_floor, self.sigma_decay * min(self.sigma, rms))
            return {name: mean.to(torch.float32)}

        cma = self._cma if self._cma is not None else CMAState.initial(global_state[name], self.sigma)
        if not torch.allclose(cma.mean, global_state[name].double(), rtol=1e-5, atol=1e-6):
            raise ValueError(
                "the global CMA-ES mean differs from the global prompt state; restore the checkpoint that "
                "holds both, or start the strategy afresh"
            )
        before = global_sigma(
            torch.cat([u.extras[SIGMA_SQ_SUM].reshape(1) for u in updates]),
            torch.cat([u.extras[PARENTS].reshape(1) for u in updates]),
        )
        at_tell = cma.with_sigma(before)
        solutions, factors = repair_injected(at_tell, torch.stack([u.state[name].double() for u in updates]))
        for update, factor in zip(updates, factors.tolist(), strict=True):
            if factor > 1:
                log.warning(
                    "FedBPT: client %d's mean lies %.3g times pycma's bound of %.4g σ_g (σ_g = %.4g) "
                    "from the global mean; repaired to the bound",
                    update.client_id,
                    factor,
                    repair_length(solutions.shape[1]),
                    before,
                )
        losses = torch.cat([u.extras[LOSS].double().reshape(1) for u in updates])
        try:
            told = cma_tell(at_tell, solutions, losses)
        except (ValueError, RuntimeError) as exc:  # cannot happen with bounded inputs: the last guard
            log.warning("FedBPT: the global CMA-ES update failed (%s); z and the search state stay", exc)
            return {name: global_state[name].clone()}
        sigma = max(self.sigma_floor, self.sigma_decay * self.sigma * told.sigma / before)
        new_mean = told.mean.to(torch.float32)
        finite = all(bool(torch.isfinite(t).all()) for t in told.to_tensors().values())
        if not (finite and bool(torch.isfinite(new_mean).all()) and math.isfinite(sigma) and sigma > 0):
            log.warning(
                "FedBPT: the global CMA-ES update of this round is not finite (σ_g = %.4g); the global z "
                "and the search state stay as they were",
                before,
            )
            return {name: global_state[name].clone()}
        self.sigma = sigma
        self._cma = told
        return {name: new_mean}

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
        if not (math.isfinite(sigma) and sigma > 0 and sigma >= self.sigma_floor):
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
