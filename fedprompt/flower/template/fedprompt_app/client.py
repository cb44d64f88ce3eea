"""The ClientApp of this Flower app, built by fedprompt from ``fedprompt.yaml``.

A module of its own, apart from the ServerApp: Flower imports it in every ClientApp process, and
a ClientApp that relays to a site worker then imports no torch and loads no model.
"""

from pathlib import Path

from fedprompt.flower import build_client_app

CONFIG_FILE = Path(__file__).resolve().parent.parent / "fedprompt.yaml"

client_app = build_client_app(CONFIG_FILE)
