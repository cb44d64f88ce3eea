"""The checks of what the server may see of each update: secure aggregation against strategies that
read single updates, differential privacy against what its accountant assumes, and server-side
clipping or noise against strategies whose clients keep state from their own update. Each takes the
validated ``RunConfig`` and raises ``ValueError`` naming the fields and the fix.
"""

from __future__ import annotations

from typing import Any

from fedprompt.config_checks.strategy_kinds import kinds_declaring


def secure_aggregation_fits(run: Any) -> None:
    """Secure aggregation gives the server the weighted sum of the updates and nothing else:
    refuse what needs single updates, and thresholds that are unsafe or cannot be met."""
    secure = run.secure_aggregation
    if not secure.enabled:
        return
    strategy = run.strategy
    if strategy.each_update is not None:
        sum_only = ", ".join(kinds_declaring(lambda c: c.each_update is None))
        raise ValueError(
            f"secure_aggregation: strategy.kind {strategy.kind} needs {strategy.each_update}, but the "
            f"server sees only the sum of the updates; use one of {sum_only}, or disable secure "
            "aggregation"
        )
    if run.robustness.max_update_norm is not None:
        raise ValueError(
            "secure_aggregation: robustness.max_update_norm is a bound the server enforces on each "
            "update, which it never sees; remove it (each client clips its own delta to "
            "secure_aggregation.clip_range instead)"
        )
    sampled = run.federation.clients_per_round(run.partition.num_clients)
    if sampled < 2:
        raise ValueError(
            f"secure_aggregation: rounds sample {sampled} client, whose 'sum' is its update; sample at "
            "least 2 (federation.min_clients, federation.fraction)"
        )
    threshold = secure.threshold_for(sampled)
    if not sampled // 2 < threshold <= sampled:
        raise ValueError(
            f"secure_aggregation.threshold {threshold} must lie in {sampled // 2 + 1}..{sampled}: more "
            f"than half of the {sampled} clients sampled per round (fewer would let the server collect "
            "both secrets of a client), and no more than are sampled"
        )
    if (2 ** (secure.bits - 1) - 1) // sampled < 2**7:
        raise ValueError(
            f"secure_aggregation.bits {secure.bits} leaves fewer than 128 quantisation levels for "
            f"{sampled} clients a round; raise it"
        )


def privacy_fits(run: Any) -> None:
    """Differential privacy holds only for what its accountant assumes: central DP replaces the
    strategy's mean by DP-FedAvg's, and local DP protects the prompt tensors alone."""
    privacy, strategy = run.privacy, run.strategy
    if privacy.kind == "central":
        if run.secure_aggregation.enabled:
            raise ValueError(
                "privacy.kind central clips each client's update on the server, which secure aggregation "
                "hides from it; with secure_aggregation use privacy.kind local (clients clip and noise "
                "before masking), or disable one of the two"
            )
        if not strategy.dp_fedavg:
            raise ValueError(
                f"privacy.kind central averages the clipped deltas with uniform weights and adds "
                f"noise (DP-FedAvg); strategy.kind {strategy.kind!r} would see each update unnoised. "
                f"Use strategy.kind {' or '.join(kinds_declaring(lambda c: c.dp_fedavg))} "
                "(privacy.server_momentum/server_lr give a server optimiser)"
            )
        if privacy.sampling == "poisson" and run.federation.min_clients > 1:
            raise ValueError(
                f"privacy.sampling poisson samples each client with probability federation.fraction, "
                f"so a round may have any number of clients, even none; federation.min_clients "
                f"({run.federation.min_clients}) cannot be enforced: set federation.min_clients: 1, or "
                "privacy.sampling: fixed"
            )
        if privacy.delta >= 1 / run.partition.num_clients:
            raise ValueError(
                f"privacy.delta ({privacy.delta}) is not below 1 / partition.num_clients "
                f"({1 / run.partition.num_clients:.3g}): a guarantee with that δ allows revealing a "
                "whole client; lower privacy.delta"
            )
    if privacy.kind == "local" and strategy.sent_beside_prompt is not None:
        raise ValueError(
            f"privacy.kind local noises the prompt tensors only; strategy.kind {strategy.kind!r} also "
            f"uses what clients send beside them ({strategy.sent_beside_prompt}), unprotected. Use "
            f"one of {', '.join(kinds_declaring(lambda c: c.sent_beside_prompt is None))}"
        )


def drift_state_unclipped(run: Any) -> None:
    """A client that keeps state from its own update (control variates, FedDyn's linear term)
    must be seen by the server as it trained: no bound may clip the update after it."""
    drift = run.strategy.drift_state
    if drift is None:
        return
    if run.robustness.max_update_norm is not None:
        raise ValueError(
            f"robustness.max_update_norm clips each update on the server, but a strategy.kind "
            f"{run.strategy.kind} client keeps {drift}, so client and server state would disagree; "
            "remove robustness.max_update_norm (or use a strategy without client state)"
        )
    if run.privacy.kind == "local" and run.strategy.sent_beside_prompt is None:
        raise ValueError(
            f"privacy.kind local clips and noises each upload, but a strategy.kind {run.strategy.kind} "
            f"client keeps {drift}, so client and server state would disagree; use another strategy"
        )
