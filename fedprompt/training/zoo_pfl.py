"""ZooPFL's local round (``prompt_modules.zoo_pfl``): the parts after the black box learn by
gradient, the input surgery before it by SPSA from the black box's outputs alone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import LocalRound, LocalTrainer
from optimizers.base import OptimizationStats
from optimizers.gradient import GradientOptimizer
from optimizers.zeroth_order import SPSAOptimizer, SPSASettings
from prompt_modules.base import PromptModule
from prompt_modules.zoo_pfl import ZooPFLClassifier


class ZooPFLTrainer(LocalTrainer):
    """Owns a ZooPFL client's round, in two phases:

    1. the black box encodes every local example once under the current input surgery (|D| queries);
       the semantic re-mapping and the personal head train by ``gradient`` on those fixed features;
    2. the input surgery's weights take SPSA steps (``spsa``: two candidates scored on the same
       fresh batch of ``zo_batch_size`` examples a step, 2·B queries), the re-mapping and head fixed.

    Every black-box call is counted: ``queries`` is what the black box saw in the round."""

    def __init__(
        self,
        gradient: GradientOptimizer,
        spsa: SPSASettings,
        batch_size: int,
        zo_batch_size: int,
        device: torch.device | str,
        eval_batch_size: int = 64,
    ) -> None:
        self.gradient = gradient
        self.spsa = spsa
        self.batch_size = batch_size
        self.zo_batch_size = zo_batch_size
        self.device = device
        self.eval_batch_size = eval_batch_size

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        if not isinstance(model, ZooPFLClassifier):
            raise TypeError(f"ZooPFL trains a ZooPFLClassifier, got {type(model).__name__}")
        if local.penalty is not None:
            raise ValueError("ZooPFL's input surgery trains by zeroth order: no gradient term can be added")
        start = model.black_box.queries
        model.eval()
        features = torch.cat(
            [model.features(b).cpu() for b in data.batches(self.eval_batch_size, device=self.device)]
        )
        fixed = TensorData({"features": features, "labels": data.labels.clone()})

        def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            return F.cross_entropy(model.classify(batch["features"]).float(), batch["labels"]), len(
                batch["labels"]
            )

        generator = torch_generator(local.instructions.seed)
        parameters = [*model.remap.parameters(), *model.head.parameters()]
        stats = self.gradient.run(
            parameters,
            loss_fn,
            lambda epoch: fixed.batches(self.batch_size, generator=generator, device=self.device),
        )
        zo = self._surgery_round(model, data, local.instructions.seed)
        stats.steps += zo.steps
        stats.queries = model.black_box.queries - start
        stats.extra.update({"surgery_steps": float(zo.steps), "surgery_loss": zo.final_loss})
        return stats

    def _surgery_round(self, model: ZooPFLClassifier, data: TensorData, seed: int) -> OptimizationStats:
        rows = torch_generator(derive_seed(seed, "zoo-pfl-surgery"))
        size = min(self.zo_batch_size, len(data))

        def population_loss(candidates: torch.Tensor) -> torch.Tensor:
            index = torch.randperm(len(data), generator=rows)[:size]
            batch = next(data.subset(index.numpy()).batches(size, device=self.device))
            return model.population_losses(candidates, batch)

        result = SPSAOptimizer(self.spsa).run(
            model.surgery.weights.detach().cpu(), population_loss, examples_per_candidate=size, seed=seed
        )
        with torch.no_grad():
            model.surgery.weights.copy_(result.params.to(model.surgery.weights.device))
        if not math.isfinite(result.stats.final_loss):
            raise FloatingPointError("ZooPFL's input surgery reached a non-finite loss")
        return result.stats
