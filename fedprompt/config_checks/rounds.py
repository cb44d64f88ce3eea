"""The checks of who takes part in a round: enough clients for ``federation.min_clients`` and for
Krum's count of updates, and a held-out acceptance test only where it can be built and undone.
Each takes the validated ``RunConfig`` and raises ``ValueError`` naming the fields and the fix.
"""

from __future__ import annotations

from typing import Any

from fedprompt.federation.strategies.config import KrumConfig


def round_sizes_fit(run: Any) -> None:
    """A round can gather ``federation.min_clients`` from the partition's clients, and enough for Krum."""
    if run.federation.min_clients > run.partition.num_clients:
        raise ValueError(
            f"federation.min_clients ({run.federation.min_clients}) exceeds partition.num_clients "
            f"({run.partition.num_clients}); lower it or add clients"
        )
    if isinstance(run.strategy, KrumConfig):
        f = run.strategy.num_byzantine
        need = max(2 * f + 3, run.strategy.keep + f)
        if run.federation.min_clients < need:
            raise ValueError(
                f"strategy.kind krum with num_byzantine={f} and keep={run.strategy.keep} needs at least "
                f"max(2f + 3, keep + f) = {need} updates a round; set federation.min_clients >= {need}"
            )


def acceptance_fits(run: Any) -> None:
    """The held-out acceptance test is carved from a text task's training pool, and cannot undo
    a round whose release a privacy accountant has counted."""
    if run.federation.acceptance is None:
        return
    if run.backbone.kind == "open-clip":
        raise ValueError(
            "federation.acceptance keeps a held-out set back from text classification's training "
            "pool; it is not built for open-clip tasks. Remove it"
        )
    if run.privacy.kind != "none":
        raise ValueError(
            f"federation.acceptance with privacy.kind {run.privacy.kind}: a rejected round's updates "
            "were still released to the server and spent privacy, which undoing the round would "
            "leave uncounted. Remove federation.acceptance or privacy"
        )
