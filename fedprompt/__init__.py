"""fedprompt: federated prompt learning on frozen backbones.

>>> import fedprompt
>>> result = fedprompt.run()                      # the embedded default, offline
>>> result = fedprompt.run("configs/fedprompt-sst2.yaml", ["federation.rounds=3"])
>>> result.metric("global_accuracy"), result.final_state
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fedprompt.config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from fedprompt.api import run
    from fedprompt.execution.results import RunResult

__all__ = ["ConfigError", "RunConfig", "RunResult", "load_config", "run"]

_LAZY = {"run": "fedprompt.api", "RunResult": "fedprompt.execution.results"}


def __getattr__(name: str) -> Any:
    """Import ``run`` and ``RunResult`` (and torch with them) on first use: a process that only
    reads configurations or relays bytes (a Flower ClientApp with a site worker) stays light."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
