"""Everything one process needs for a run, built once from the configuration."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from fedprompt.batching import TensorData
from fedprompt.client import Client
from fedprompt.config import RunConfig
from fedprompt.strategies.base import Strategy
from prompt_modules.base import PromptModule


@dataclass
class EvalSet:
    """A held-out set the server reports on beside the test set (e.g. base and novel classes):
    its examples and the class names its labels index, which the model scores against."""

    data: TensorData
    class_names: list[str]


@dataclass
class Experiment:
    """Owns what a runtime drives: the shared prompt module on its frozen backbone (one per process),
    the clients, the server's held-out test data, the strategy and the device."""

    model: PromptModule
    clients: dict[int, Client]
    test_data: TensorData
    strategy: Strategy
    device: torch.device
    backbone_bytes: int
    label_names: list[str]
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)
    """Reported as ``<name>_accuracy`` each evaluation; the model must have ``scoring(class_names)``."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Facts the run summary carries (plain JSON): e.g. that the backbone is a demo one and what it
    was trained on, baselines to compare with, rows the data left out."""


def build_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Build the experiment for the configured backbone kind.

    ``client_ids`` limits the clients built to those ids (a process that hosts some clients
    only, e.g. one Flower SuperNode); the partition is the same whichever ids are built.
    The layer-dependent fields are checked from the model's configuration before anything loads.
    """
    from fedprompt.preflight import check_model_fields

    check_model_fields(config)
    if config.backbone.kind in ("hf-text", "remote"):
        from fedprompt.text_task import build_text_experiment

        return build_text_experiment(config, client_ids)
    if config.backbone.kind == "open-clip" and config.data.source == "vqa":
        from fedprompt.vqa_task import build_vqa_experiment

        return build_vqa_experiment(config, client_ids)
    if config.backbone.kind == "open-clip":
        from fedprompt.vision_task import build_vision_experiment

        return build_vision_experiment(config, client_ids)
    raise NotImplementedError(f"backbone kind {config.backbone.kind!r} has no experiment builder")
