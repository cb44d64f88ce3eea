"""The ServerApp of this Flower app, built by fedprompt from ``fedprompt.yaml``.

The YAML ships inside the app (Flower copies it to the SuperLink and every SuperNode), so every
process runs the same configuration; ``--run-config "fedprompt-overrides='key=value ...'"``
changes it for one run.
"""

from pathlib import Path

from fedprompt.flower import build_server_app

CONFIG_FILE = Path(__file__).resolve().parent.parent / "fedprompt.yaml"

server_app = build_server_app(CONFIG_FILE)
