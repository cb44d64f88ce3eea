"""Client-level differential privacy of the prompt updates: the plan and accountant
(:mod:`~fedprompt.privacy.accounting`), DP-FedAvg on a trusted server
(:mod:`~fedprompt.privacy.central`) and noise added on each client (:mod:`~fedprompt.privacy.local`),
built here from a run's ``privacy`` section."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedprompt.client_rules import ClientRule
from fedprompt.config import RunConfig
from fedprompt.privacy.accounting import PrivacyPlan, plan_privacy
from fedprompt.privacy.central import CentralPrivacy, PrivacyCheckFailed
from fedprompt.privacy.local import LocalPrivacyAccountant, LocalPrivacyRule

if TYPE_CHECKING:
    from fedprompt.server import AggregationStage

__all__ = [
    "CentralPrivacy",
    "LocalPrivacyAccountant",
    "LocalPrivacyRule",
    "PrivacyCheckFailed",
    "PrivacyPlan",
    "plan_privacy",
    "privacy_client_rule",
    "privacy_stages",
]


def privacy_stages(config: RunConfig) -> list[AggregationStage]:
    """The server's privacy stage: DP-FedAvg's noise and accountant (central), the per-client
    accountant (local), or none."""
    plan = plan_privacy(config)
    if plan is None:
        return []
    privacy = config.privacy
    if plan.kind == "local":
        return [LocalPrivacyAccountant(plan)]
    return [
        CentralPrivacy(
            plan,
            config.seed,
            config.robustness.max_update_norm,
            server_lr=privacy.server_lr,
            server_momentum=privacy.server_momentum,
            adaptive=privacy.adaptive_clipping,
            secret_noise=privacy.noise_seed == "secret",
        )
    ]


def privacy_client_rule(rule: ClientRule, config: RunConfig) -> ClientRule:
    """The strategy's client rule, wrapped to clip and noise each upload under local DP."""
    plan = plan_privacy(config)
    if plan is None or plan.kind != "local":
        return rule
    return LocalPrivacyRule(
        rule, plan.clip_norm, plan.noise_multiplier, config.privacy.noise_seed == "secret"
    )
