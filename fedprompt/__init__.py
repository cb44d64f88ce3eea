"""fedprompt: federated prompt learning on frozen backbones.

>>> import fedprompt
>>> result = fedprompt.run()                      # the embedded default, offline
>>> result = fedprompt.run("configs/fedprompt-sst2.yaml", ["federation.rounds=3"])
>>> result.metric("global_accuracy"), result.final_state
"""

from fedprompt.api import run
from fedprompt.config import ConfigError, RunConfig, load_config
from fedprompt.results import RunResult

__all__ = ["ConfigError", "RunConfig", "RunResult", "load_config", "run"]
