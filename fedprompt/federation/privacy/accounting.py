"""The numbers a differentially private run rests on, and the privacy it spends, by dp-accounting's
RDP accountant (Google's ``dp-accounting``).

Central DP (DP-FedAvg): one round is a sampled Gaussian mechanism on the sum of the clipped
deltas (sensitivity C, noise σC). Poisson sampling with rate q is accounted as
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` for add-or-remove-one-client neighbours (the
analysis of DP-FedAvg). A fixed number K of clients drawn without replacement is accounted as
``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(σ/2))`` for replace-one-client neighbours
(N public): replacing a client moves the sum by up to 2C, hence σ/2.

Local DP: each upload is a Gaussian mechanism on one client's clipped delta; any two deltas of a
client lie within 2C of each other, so one upload is ``GaussianDpEvent(σ/2)``, composed over the
uploads of the client that uploaded most. Sampling gives no amplification: the server sees who
uploaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from fedprompt.config import ConfigError, PrivacyConfig, RunConfig

RDP_ORDERS = (*range(2, 64), 128, 256, 512, 1024)
"""RDP orders the accountant optimises over: integers, where the sampled Gaussian's RDP is exact
(the library's default fractional orders below 2 fail to converge at small q, and cost seconds,
for ε a few percent lower at most at large ε)."""

log = logging.getLogger("fedprompt.privacy")

if TYPE_CHECKING:  # dp-accounting (with scipy) loads when a private run first needs it
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant


@dataclass(frozen=True)
class PrivacyPlan:
    """Owns what the guarantee of a differentially private run assumes: the kind, the clipping norm,
    the noise multiplier σ (and, with adaptive clipping, the share of it spent on the noised count),
    δ, the population N, the expected clients per round K, and how they are sampled."""

    kind: Literal["central", "local"]
    clip_norm: float
    noise_multiplier: float
    delta: float
    rounds: int
    population: int
    expected_clients: float
    poisson: bool
    count_stddev: float | None = None
    """σ_b of adaptive clipping's noised count (None: fixed clipping)."""

    @property
    def sampling_rate(self) -> float:
        """q = K / N."""
        return self.expected_clients / self.population

    @property
    def sampling(self) -> str:
        """How clients are drawn, as the accountant assumes it."""
        if self.kind == "local":
            return "fixed (no amplification: local DP)"
        return "poisson" if self.poisson else "fixed (without replacement, replace-one neighbours)"

    @property
    def delta_noise_multiplier(self) -> float:
        """σ_Δ, the noise on the clipped deltas in units of C. With adaptive clipping the count of
        updates within C (sensitivity 1/2, noise σ_b) takes part of the budget: σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2)
        (Andrew et al. 2021, Theorem 1), so both queries together cost what one of noise σ does."""
        if self.count_stddev is None:
            return self.noise_multiplier
        return (self.noise_multiplier**-2 - (2 * self.count_stddev) ** -2) ** -0.5

    def event(self, noise_multiplier: float | None = None) -> dp_accounting.DpEvent:
        """One round (central) or one upload (local) as a DpEvent; σ defaults to the plan's."""
        import dp_accounting

        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if self.kind == "local":
            return dp_accounting.GaussianDpEvent(sigma / 2)
        if self.poisson:
            return dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(sigma)
            )
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, round(self.expected_clients), dp_accounting.GaussianDpEvent(sigma / 2)
        )

    def accountant(self) -> RdpAccountant:
        """A fresh RDP accountant for this plan's neighbouring relation."""
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        relation = (
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
            if self.kind == "central" and self.poisson
            else dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        return RdpAccountant(list(RDP_ORDERS), relation)

    def epsilon(self, steps: int, noise_multiplier: float | None = None) -> float:
        """ε at δ after ``steps`` rounds (central) or ``steps`` uploads of one client (local)."""
        if steps <= 0:
            return 0.0
        return float(self.accountant().compose(self.event(noise_multiplier), steps).get_epsilon(self.delta))

    def calibrated(self, target_epsilon: float) -> float:
        """The smallest σ whose ε at δ over the plan's rounds is at most ``target_epsilon``
        (dp-accounting's search)."""
        import dp_accounting

        return float(
            dp_accounting.calibrate_dp_mechanism(
                self.accountant,
                lambda sigma: dp_accounting.SelfComposedDpEvent(self.event(sigma), self.rounds),
                target_epsilon,
                self.delta,
            )
        )


def plan_privacy(config: RunConfig) -> PrivacyPlan | None:
    """The privacy plan of a configuration (None without differential privacy), σ computed from
    ``target_epsilon`` when asked; a noise too small for the asked ε, or an adaptive-clipping count
    noise too small for σ, raises ConfigError with the numbers. Cached: every party computes it."""
    fed = config.federation
    return _plan(
        config.privacy.model_dump_json(),
        config.partition.num_clients,
        fed.rounds,
        fed.fraction,
        fed.min_clients,
    )


@lru_cache(maxsize=16)
def _plan(
    privacy_json: str, population: int, rounds: int, fraction: float, min_clients: int
) -> PrivacyPlan | None:
    privacy = PrivacyConfig.model_validate_json(privacy_json)
    if privacy.kind == "none":
        return None
    assert privacy.clip_norm is not None  # the config's validator guarantees it
    poisson = privacy.kind == "central" and privacy.sampling == "poisson"
    fixed_count = min(population, max(min_clients, math.ceil(fraction * population)))
    expected = fraction * population if poisson else float(fixed_count)
    adaptive = privacy.adaptive_clipping if privacy.kind == "central" else None
    count_stddev = None
    if adaptive is not None:
        count_stddev = adaptive.count_stddev if adaptive.count_stddev is not None else expected / 20
    plan = PrivacyPlan(
        kind=privacy.kind,
        clip_norm=privacy.clip_norm,
        noise_multiplier=privacy.noise_multiplier or 0.0,  # from target_epsilon below when not given
        delta=privacy.delta,
        rounds=rounds,
        population=population,
        expected_clients=expected,
        poisson=poisson,
        count_stddev=count_stddev,
    )
    over = "rounds" if privacy.kind == "central" else "uploads of a client sampled every round"
    if privacy.noise_multiplier is None:
        assert privacy.target_epsilon is not None
        sigma = plan.calibrated(privacy.target_epsilon)
        log.info(
            "privacy: noise_multiplier %.4f spends ε=%.3f at δ=%g over %d %s",
            sigma,
            privacy.target_epsilon,
            privacy.delta,
            rounds,
            over,
        )
        plan = replace(plan, noise_multiplier=sigma)
    elif privacy.target_epsilon is not None:
        spent = plan.epsilon(rounds)
        if spent > privacy.target_epsilon:
            needed = plan.calibrated(privacy.target_epsilon)
            raise ConfigError(
                f"privacy.noise_multiplier: {privacy.noise_multiplier} spends ε={spent:.3f} at "
                f"δ={privacy.delta:g} over {rounds} {over} (q={plan.sampling_rate:.4g}, {plan.sampling}), "
                f"above privacy.target_epsilon {privacy.target_epsilon}; raise it to at least "
                f"{math.ceil(needed * 1e4) / 1e4}, "
                "or remove it to have it computed"
            )
    if count_stddev is not None and 2 * count_stddev <= plan.noise_multiplier:
        raise ConfigError(
            f"privacy.adaptive_clipping.count_stddev: σ_b={count_stddev:.4g} leaves no budget for the "
            f"deltas' noise (noise_multiplier σ={plan.noise_multiplier:.4g} needs 2·σ_b > σ); raise "
            f"count_stddev above {plan.noise_multiplier / 2:.4g}, or add clients per round (default "
            "σ_b = K/20)"
        )
    return plan
