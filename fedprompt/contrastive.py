"""ATPFL's contrastive local objective for twin prompts, and the client state it keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedprompt.batching import TensorData
from fedprompt.training import FitInstructions, GradientTrainer, LocalContext
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
        schedule: RoundSchedule | None = None,
    ) -> None:
        super().__init__(optimizer, batch_size, device, schedule)
        if ce_weight <= 0 or temperature <= 0:
            raise ValueError(f"ce_weight and temperature must be positive, got {ce_weight}, {temperature}")
        self.ce_weight = ce_weight
        self.temperature = temperature
        self.eval_batch_size = eval_batch_size

    def train(
        self,
        model: PromptModule,
        data: TensorData,
        instructions: FitInstructions,
        context: LocalContext | None = None,
    ) -> OptimizationStats:
        context = context if context is not None else LocalContext()
        global_state = model.prompt_state()
        previous = {
            k.removeprefix(PREVIOUS): v for k, v in context.carried.items() if k.startswith(PREVIOUS)
        }
        positive = self._features(model, data)
        negative = positive
        if previous:
            model.load_state_dict(previous, strict=True)
            try:
                negative = self._features(model, data)
            finally:
                model.load_state_dict(global_state, strict=True)
        augmented = TensorData({**data.tensors, POSITIVE: positive, NEGATIVE: negative})
        stats = super().train(model, augmented, instructions, context)
        context.carry_out.update({PREVIOUS + k: v for k, v in model.prompt_state().items()})
        return stats

    def objective(self, model: PromptModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, features = model.forward_with_features(batch)
        ce = F.cross_entropy(logits.float(), batch["labels"])
        positive = (features * batch[POSITIVE]).sum(-1) / self.temperature
        negative = (features * batch[NEGATIVE]).sum(-1) / self.temperature
        return self.ce_weight * ce + F.softplus(negative - positive).mean()

    @torch.no_grad()
    def _features(self, model: PromptModule, data: TensorData) -> torch.Tensor:
        model.eval()
        parts = [
            model.image_features(b).cpu() for b in data.batches(self.eval_batch_size, device=self.device)
        ]
        return torch.cat(parts)
