"""Write a Flower app around a fedprompt configuration (``fedprompt flower new-app``).

The app is a folder Flower can run as it is: ``pyproject.toml`` (``[tool.flwr.app.components]``
and the run config), ``fedprompt.yaml`` (the resolved fedprompt configuration, validated here so
a mistake fails now and not on every site), the ``fedprompt_app`` package that builds the
ServerApp and ClientApp, and a README with the commands of both engines. Imports no Flower.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

import yaml

from fedprompt.config import load_config
from fedprompt.flower.app_config import CONFIG_FILE_NAME

_FILES = (
    "pyproject.toml",
    "README.md",
    "fedprompt_app/__init__.py",
    "fedprompt_app/server.py",
    "fedprompt_app/client.py",
)


def app_name(run_name: str) -> str:
    """A valid Flower app name (a letter, then letters, digits and hyphens) from a run name."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", run_name).strip("-").lower()
    return f"fedprompt-{name}" if name else "fedprompt-app"


def new_app(
    directory: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    name: str | None = None,
) -> Path:
    """Write the Flower app for ``config`` (a YAML path, or the embedded default) into ``directory``.

    ``directory`` must not exist or be empty. Raises ConfigError for a bad configuration and
    FileExistsError for a non-empty directory. Returns the directory.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder; choose a new one")
    resolved = load_config(config, overrides)
    name = name or app_name(resolved.name)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
        raise ValueError(f"app name {name!r} must start with a letter and hold only letters, digits, hyphens")
    template = resources.files("fedprompt.flower").joinpath("template")
    for file in _FILES:
        text = Template(template.joinpath(file).read_text()).safe_substitute(
            name=name, config_file=CONFIG_FILE_NAME
        )
        out = target / file
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    header = (
        "# fedprompt configuration of this Flower app (resolved: every default filled in).\n"
        "# The ServerApp and every ClientApp read it; relative data paths are resolved on each site.\n"
    )
    body = yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False)
    (target / CONFIG_FILE_NAME).write_text(header + body)
    return target
