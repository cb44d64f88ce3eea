"""The ``strategy.kind`` values whose configuration class declares a capability, which the checks
name in their errors (the strategies that work under secure aggregation, or with DP-FedAvg, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from fedprompt.federation.strategies.config import STRATEGY_CONFIGS, StrategySettings


def kinds_declaring(declares: Callable[[type[StrategySettings]], bool]) -> list[str]:
    """The ``strategy.kind`` values whose configuration class declares what ``declares`` asks."""
    kinds = []
    for config in STRATEGY_CONFIGS:
        if declares(config):
            kinds.extend(get_args(config.model_fields["kind"].annotation))
    return kinds
