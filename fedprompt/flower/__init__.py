"""fedprompt on Flower: the same configuration, Client, Server and Strategy code in a Flower app.

``build_server_app(config_file)`` and ``build_client_app(config_file)`` return a Flower
``ServerApp`` and ``ClientApp`` (Flower's Message API) that run the fedprompt job that
``config_file`` describes, on Flower's simulation engine or its deployment engine (one SuperLink,
one SuperNode per data partition). ``fedprompt flower new-app DIR --config CONFIG`` writes a
ready Flower app around them; ``fedprompt flower site-worker`` keeps a site's backbone loaded
across the per-message ClientApp processes of the deployment engine
(``fedprompt.flower.site_worker``). Partitions stay bound to the node that first claimed them
(``fedprompt.flower.bindings``); with ``secure_aggregation.enabled`` the server learns only the sum
of the updates (``fedprompt.flower.secure_round`` and ``secure_client``, on ``fedprompt.federation.secagg``).
Needs the ``flower`` extra (``pip install 'fedprompt[flower]'``); ``fedprompt.flower.template`` alone
does not import Flower.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_client_app": "fedprompt.flower.client_app",
    "build_server_app": "fedprompt.flower.server_app",
    "run_server": "fedprompt.flower.server_app",
    "FedPromptStrategy": "fedprompt.flower.strategy",
    "NotEnoughClientsError": "fedprompt.flower.rounds",
    "new_app": "fedprompt.flower.template",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the public names on first use, so writing an app template needs no Flower install."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
