"""Central differential privacy (DP-FedAvg, McMahan et al. 2018) as an aggregation stage, with
adaptive clipping (Andrew et al. 2021) and a server step with momentum applied to the noised mean."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fedprompt.config import AdaptiveClippingConfig
from fedprompt.federation.privacy.accounting import PrivacyPlan
from fedprompt.federation.privacy.noise import NoiseSource, SystemNoise
from fedprompt.federation.state import State
from fedprompt.federation.update_pipeline import delta_norm

if TYPE_CHECKING:
    from fedprompt.federation.server import RoundRecord, Server

NORM_TOLERANCE = 1e-9
"""Relative slack on ‖Δ_k‖ ≤ C: a clipped delta, rebuilt as θ + s·Δ in float64, measures C to
float64 rounding."""

_MOMENTUM = "momentum/"


class PrivacyCheckFailed(RuntimeError):
    """An update is not what the accountant assumed (longer than the clipping norm, other tensors);
    the round is skipped rather than released with a wrong guarantee."""


def check_clipped(what: str, norm: float, bound: float) -> None:
    """Raise PrivacyCheckFailed when a clipped delta's norm exceeds ``bound`` beyond float64 rounding."""
    if not norm <= bound * (1 + NORM_TOLERANCE):
        raise PrivacyCheckFailed(f"{what} has norm {norm!r} after clipping, above the bound {bound!r}")


class CentralPrivacy:
    """DP-FedAvg on the server, after the strategy (FedAvg/FedProx, whose example-weighted mean it
    replaces). Owns the clipping norm in force C (changed by adaptive clipping), the server momentum
    and the source of the noise (the operating system's CSPRNG unless a reproducible source is
    asked for: ``fedprompt.federation.privacy.noise``).

    Each round: ``begin_round`` sets the update pipeline's bound to min(robustness bound, C), so
    every accepted delta Δ_k = θ_k − θ is clipped to C, and reports ε at δ after this round.
    ``apply`` checks each accepted update (the global state's tensors and shapes; ‖Δ_k‖ ≤ C), then
    releases Δ̃ = Σ_k Δ_k / K + N(0, (σ_Δ·C/K)²) per coordinate (uniform weights; K the expected
    number of clients, fixed whatever arrived, so one client moves the sum by C at most), and steps
    v ← β·v + Δ̃, θ ← θ + η·v. A round with no update still releases noise (what Poisson sampling's
    analysis assumes). With adaptive clipping, b̃ = (Σ_k (1[‖Δ_k‖ ≤ C] − ½) + N(0, σ_b²)) / K + ½,
    clamped to [0, 1], and C ← C·exp(−η_C·(b̃ − γ)) for the next round.
    """

    name = "privacy"
    runs_without_updates = True

    def __init__(
        self,
        plan: PrivacyPlan,
        robustness_bound: float | None,
        *,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        adaptive: AdaptiveClippingConfig | None = None,
        noise: NoiseSource | None = None,
    ) -> None:
        if plan.kind != "central":
            raise ValueError(f"CentralPrivacy needs a central privacy plan, got {plan.kind!r}")
        if (adaptive is None) != (plan.count_stddev is None):
            raise ValueError("adaptive clipping and the plan's count noise go together")
        self.plan = plan
        self.noise = noise if noise is not None else SystemNoise()
        self.robustness_bound = robustness_bound
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.adaptive = adaptive
        self.clip_norm = plan.clip_norm
        self.momentum: State = {}

    def bound(self) -> float:
        """The norm bound in force: the smaller of the robustness bound and C (a tighter bound only
        lowers the sensitivity the noise is calibrated to)."""
        return self.clip_norm if self.robustness_bound is None else min(self.robustness_bound, self.clip_norm)

    def begin_round(self, server: Server, record: RoundRecord) -> None:
        server.max_update_norm = self.bound()
        plan = self.plan
        record.stage_metrics.update(
            {
                "epsilon": plan.epsilon(record.round),
                "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier,
                "clip_norm": self.clip_norm,
                "sampling_rate": plan.sampling_rate,
                "expected_clients": plan.expected_clients,
            }
        )

    def apply(self, server: Server, record: RoundRecord, previous: State, aggregated: State) -> State:
        clip, expected = self.clip_norm, self.plan.expected_clients
        total = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in previous.items()}
        below = 0.0
        for update in sorted(record.accepted, key=lambda u: u.client_id):
            self._check(update.client_id, update.state, previous, record, clip)
            for name, tensor in update.state.items():
                total[name] += tensor.detach().to("cpu", torch.float64) - previous[name].to(torch.float64)
            below += (1.0 if record.norms[update.client_id] <= clip else 0.0) - 0.5
        std = self.plan.delta_noise_multiplier * clip / expected
        noise = self.noise.normal(
            {name: tuple(t.shape) for name, t in total.items()}, "dp-noise", record.round
        )
        noised = {name: total[name] / expected + std * noise[name] for name in sorted(total)}
        if self.server_momentum > 0:
            noised = {
                name: self.server_momentum * self.momentum.get(name, torch.zeros_like(value)) + value
                for name, value in noised.items()
            }
            self.momentum = {name: value.clone() for name, value in noised.items()}
        record.stage_metrics["noise_std"] = std
        if self.adaptive is not None:
            count_noise = self.noise.normal({"count": ()}, "dp-count-noise", record.round)["count"]
            noisy_below = below + self.plan.count_stddev * float(count_noise)
            fraction = min(1.0, max(0.0, noisy_below / expected + 0.5))
            self.clip_norm = clip * math.exp(
                -self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile)
            )
            record.stage_metrics["unclipped_fraction"] = fraction
        return {name: previous[name].to(torch.float64) + self.server_lr * noised[name] for name in previous}

    def _check(self, client_id: int, state: State, previous: State, record: RoundRecord, clip: float) -> None:
        """The update holds the global state's tensors and shapes, was clipped by the pipeline, and
        its delta lies within C: what the noise was calibrated to."""
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        expected = {name: tuple(t.shape) for name, t in previous.items()}
        if shapes != expected:
            raise PrivacyCheckFailed(
                f"the update of client {client_id} has tensors {shapes}; the noise covers {expected}"
            )
        if client_id not in record.norms:
            raise PrivacyCheckFailed(f"the update of client {client_id} did not go through norm clipping")
        check_clipped(f"the delta of client {client_id}", delta_norm(state, previous), clip)

    def state_dict(self) -> State:
        state = {
            "clip_norm": torch.tensor(self.clip_norm, dtype=torch.float64),
            "noise_multiplier": torch.tensor(self.plan.noise_multiplier, dtype=torch.float64),
        }
        state.update({_MOMENTUM + name: value for name, value in self.momentum.items()})
        return state

    def load_state_dict(self, state: State) -> None:
        if not state:
            return
        sigma = float(state["noise_multiplier"])
        if sigma != self.plan.noise_multiplier:
            raise ValueError(
                f"this run's noise was calibrated to noise_multiplier {sigma!r}; now it would be "
                f"{self.plan.noise_multiplier!r} (privacy.target_epsilon over a changed federation.rounds). "
                "Resume with the run's rounds, or start a new run"
            )
        self.clip_norm = float(state["clip_norm"])
        self.momentum = {
            name.removeprefix(_MOMENTUM): value.clone().to(torch.float64)
            for name, value in state.items()
            if name.startswith(_MOMENTUM)
        }
