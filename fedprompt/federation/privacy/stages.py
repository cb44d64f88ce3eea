"""What a run's ``privacy`` section plugs into a round: the server's aggregation stage (DP-FedAvg's
noise and accountant, or local DP's accountant) and the clients' upload rule (local DP's noise)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedprompt.config import RunConfig
from fedprompt.federation.client_rules import ClientRule
from fedprompt.federation.privacy.accounting import plan_privacy
from fedprompt.federation.privacy.central import CentralPrivacy
from fedprompt.federation.privacy.local import LocalPrivacyAccountant, LocalPrivacyRule
from fedprompt.federation.privacy.noise import REPRODUCIBLE, REPRODUCIBLE_WARNING, noise_source

if TYPE_CHECKING:
    from fedprompt.federation.server import AggregationStage


log = logging.getLogger("fedprompt.privacy")


def privacy_stages(config: RunConfig) -> list[AggregationStage]:
    """The server's privacy stage: DP-FedAvg's noise and accountant (central), the per-client
    accountant (local), or none."""
    plan = plan_privacy(config)
    if plan is None:
        return []
    privacy = config.privacy
    if privacy.noise_seed == REPRODUCIBLE:
        log.warning(REPRODUCIBLE_WARNING)
    if plan.kind == "local":
        return [LocalPrivacyAccountant(plan)]
    return [
        CentralPrivacy(
            plan,
            config.robustness.max_update_norm,
            server_lr=privacy.server_lr,
            server_momentum=privacy.server_momentum,
            adaptive=privacy.adaptive_clipping,
            noise=noise_source(privacy.noise_seed, config.seed),
        )
    ]


def privacy_client_rule(rule: ClientRule, config: RunConfig) -> ClientRule:
    """The strategy's client rule, wrapped to clip and noise each upload under local DP."""
    plan = plan_privacy(config)
    if plan is None or plan.kind != "local":
        return rule
    return LocalPrivacyRule(rule, plan.clip_norm, plan.noise_multiplier, config.privacy.noise_seed)
