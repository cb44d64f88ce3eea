"""What a local round cost on a metered backend (a language-model server or engine), added to the
round's statistics so the run records it per client and per round."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import LocalRound, LocalTrainer
from optimizers.base import OptimizationStats
from prompt_modules.base import PromptModule


@runtime_checkable
class Metered(Protocol):
    """A prompt module whose backend counts what it was asked (cumulative counters)."""

    def meter(self) -> dict[str, int]: ...


METER_PREFIX = "api_"
"""Metric names of the counters: ``api_requests``, ``api_prompt_tokens``, ``api_completion_tokens``, ..."""


class MeteredTrainer(LocalTrainer):
    """Owns nothing but a trainer: runs it and adds to its statistics the difference of the module's
    counters over the round (``api_<counter>``) and the share of scored label words that were the
    floor (``floored_share``; 0 when the backend returns every label word)."""

    def __init__(self, inner: LocalTrainer) -> None:
        self.inner = inner

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        if not isinstance(model, Metered):
            return self.inner.train(model, data, local)
        before = model.meter()
        stats = self.inner.train(model, data, local)
        after = model.meter()
        spent = {name: after[name] - before.get(name, 0) for name in after}
        stats.extra.update({METER_PREFIX + name: float(value) for name, value in spent.items()})
        scored = spent.get("scored_words", 0)
        stats.extra["floored_share"] = spent.get("floored_words", 0) / scored if scored else 0.0
        return stats
