"""ATPFL's contrastive local objective for twin prompts, and the client state it keeps."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import GradientTrainer, LocalRound
from optimizers.base import OptimizationStats
from optimizers.gradient import GradientOptimizer
from optimizers.schedules import RoundSchedule
from prompt_modules.base import PromptModule

POSITIVE = "contrast_global_features"
NEGATIVE = "contrast_previous_features"
PREVIOUS = "previous/"
"""Carried-state prefix of the client's prompt state at the end of its previous round."""


class ContrastiveTrainer(GradientTrainer):
    """Owns ATPFL's local objective and the one piece of client state it needs.

    loss = η · CE + L_con, with per example
    L_con = −log(e^{cos(z, z_g)/T} / (e^{cos(z, z_g)/T} + e^{cos(z, z_p)/T}))
          = softplus((cos(z, z_p) − cos(z, z_g)) / T),
    z the image features under the prompts being trained, z_g under the global prompts the round
    started from (the positive), z_p under this client's own prompts at the end of its previous
    round (the negative). z_g and z_p are constant during a round: they are computed once per
    round, in one pass without gradients over the local data.

    The previous local prompt state is the client's carried state (``previous/<name>``): kept by
    the runtime's client-state store, committed only when the server used the update, and
    checkpointed with the run. It never crosses the wire. In a client's first round there is no
    previous state and the global prompts stand in, so z_p = z_g and the term is the constant log 2.
    """

    def __init__(
        self,
        optimizer: GradientOptimizer,
        batch_size: int,
        device: torch.device | str,
        ce_weight: float = 0.2,
        temperature: float = 2.0,
        eval_batch_size: int = 64,
        text_contrast: bool = False,
        schedule: RoundSchedule | None = None,
    ) -> None:
        super().__init__(optimizer, batch_size, device, schedule)
        if ce_weight <= 0 or temperature <= 0:
            raise ValueError(f"ce_weight and temperature must be positive, got {ce_weight}, {temperature}")
        self.ce_weight = ce_weight
        self.temperature = temperature
        self.eval_batch_size = eval_batch_size
        self.text_contrast = text_contrast
        self._class_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        global_state = model.prompt_state()
        previous = {k.removeprefix(PREVIOUS): v for k, v in local.carried.items() if k.startswith(PREVIOUS)}
        positive, positive_classes = self._features(model, data), self._class_features(model)
        negative, negative_classes = positive, positive_classes
        if previous:
            model.load_state_dict(previous, strict=True)
            try:
                negative, negative_classes = self._features(model, data), self._class_features(model)
            finally:
                model.load_state_dict(global_state, strict=True)
        if positive_classes is not None and negative_classes is not None:
            self._class_targets = (positive_classes, negative_classes)
        augmented = replace(data, tensors={**data.tensors, POSITIVE: positive, NEGATIVE: negative})
        stats = super().train(model, augmented, local)
        local.carry_out.update({PREVIOUS + k: v for k, v in model.prompt_state().items()})
        return stats

    def objective(self, model: PromptModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, features, classes = model.forward_with_all_features(batch)
        ce = F.cross_entropy(logits.float(), batch["labels"])
        loss = self.ce_weight * ce + self._contrast(features, batch[POSITIVE], batch[NEGATIVE])
        if self.text_contrast:
            if self._class_targets is None:
                raise RuntimeError("the text contrast needs the class features that train() computes first")
            positive, negative = (t.to(classes.device) for t in self._class_targets)
            loss = loss + self._contrast(classes, positive, negative)
        return loss

    def _contrast(self, z: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """mean softplus((cos(z, negative) − cos(z, positive)) / T) over rows of unit vectors."""
        return F.softplus(((z * negative).sum(-1) - (z * positive).sum(-1)) / self.temperature).mean()

    @torch.no_grad()
    def _class_features(self, model: PromptModule) -> torch.Tensor | None:
        return model.class_features().detach().clone().cpu() if self.text_contrast else None

    @torch.no_grad()
    def _features(self, model: PromptModule, data: TensorData) -> torch.Tensor:
        model.eval()
        parts = [
            model.image_features(b).cpu() for b in data.batches(self.eval_batch_size, device=self.device)
        ]
        return torch.cat(parts)
