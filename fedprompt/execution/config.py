"""Settings of the run machinery: where a run writes its results folder (``output``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from fedprompt.config_base import StrictModel


class OutputConfig(StrictModel):
    """Where a run writes its results folder, and whether it plots its curves there."""

    dir: Path = Path("runs")
    plot: bool = Field(
        True, description="Write plot.png (accuracy per round and per byte) at the end (needs matplotlib)."
    )
