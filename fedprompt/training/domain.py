"""The local objective of FedAPT's clients: the class cross-entropy of the keyed prompt, plus the
adaptive network's cross-entropy toward the client's own key (the reference's
``CE(out_cls, y) + CE(out_dom, client)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedprompt.training.gradient import GradientTrainer
from prompt_modules.base import PromptModule
from prompt_modules.domain_prompts import DOMAIN, AdaptivePromptClassifier


class AdaptiveDomainTrainer(GradientTrainer):
    """A ``GradientTrainer`` whose loss adds ``domain_weight`` times the cross-entropy of the model's
    ``domain_logits`` toward each example's ``domain`` (the client's key index)."""

    def __init__(self, *args, domain_weight: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if domain_weight < 0:
            raise ValueError(f"domain_weight must be >= 0, got {domain_weight}")
        self.domain_weight = domain_weight

    def objective(self, model: PromptModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().objective(model, batch)
        if self.domain_weight == 0:
            return loss
        if not isinstance(model, AdaptivePromptClassifier):
            raise TypeError(f"the domain loss needs FedAPT's classifier, not {type(model).__name__}")
        domain = F.cross_entropy(model.domain_logits(batch).float(), batch[DOMAIN].reshape(-1).long())
        return loss + self.domain_weight * domain
