"""ZooPFL (Lu et al. 2023, "ZooPFL: Exploring Black-box Foundation Models for Personalized
Federated Learning"): a foundation model used as a black box (inputs in, output embeddings out,
no gradients), adapted on each client by three small parts around it:

- input surgery, a learned transformation of the input embeddings before the black box: a
  residual bottleneck per token, e' = e + D·tanh(E·e) (E [r, h], D [h, r]; D starts at 0, so the
  surgery starts as the identity). Its loss gradient would have to pass through the black box, so it
  is trained by zeroth-order estimates (SPSA) from the black box's outputs alone;
- semantic re-mapping, a linear map of the black box's output embedding (starting as the identity),
  trained by gradient: it sits after the black box, whose outputs are constants for it;
- a personalised linear head per client, trained by gradient, which never leaves its client.

The input surgery and the re-mapping are shared (aggregated); the head is personal.
``BlackBoxEncoder`` is the only way the module reaches the model: it returns pooled output
embeddings under ``torch.inference_mode`` and counts every example it encodes as one query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.base import Batch, PromptModule
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.text_classifier import pad_right, pool, template_affixes


class BlackBoxEncoder:
    """A frozen text encoder seen as a black box: input embeddings and a mask in, the mean-pooled
    output embedding out, never a gradient. Owns the count of examples it encoded (queries)."""

    def __init__(self, backbone: HFTextBackbone) -> None:
        self._backbone = backbone
        self.queries = 0

    @property
    def hidden_size(self) -> int:
        return self._backbone.hidden_size

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled output embeddings [B, h] of input embeddings [B, T, h] (detached, no graph)."""
        with torch.inference_mode():
            hidden = self._backbone.hidden_states(inputs_embeds.detach(), attention_mask)
            out = pool(hidden, attention_mask, "mean").float()
        self.queries += inputs_embeds.shape[0]
        return out.clone()


class InputSurgery(nn.Module):
    """Owns the surgery's weights as one vector ``weights`` (E [rank, h] then D [h, rank]), what SPSA
    perturbs; e' = e + D·tanh(E·e) per token. E starts N(0, 1/h), D at 0 (the identity)."""

    def __init__(self, hidden: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.hidden, self.rank = hidden, rank
        weights = torch.zeros(2 * rank * hidden)
        weights[: rank * hidden] = torch.randn(rank * hidden, generator=generator) / hidden**0.5
        self.weights = nn.Parameter(weights)

    def apply(self, embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Transformed embeddings [B, T, h] under ``weights`` (the module's own by default)."""
        w = self.weights if weights is None else weights
        r, h = self.rank, self.hidden
        encoder = w[: r * h].reshape(r, h).to(embeds)
        decoder = w[r * h :].reshape(h, r).to(embeds)
        return embeds + torch.tanh(embeds @ encoder.T) @ decoder.T


class ZooPFLClassifier(PromptModule):
    """Owns ZooPFL's three parts (``surgery.weights``, ``remap.*``, ``head.*``) around a black-box
    encoder, the public tokenizer, the input template and the token-embedding lookup it feeds the
    black box with. Scores populations of surgery weights (``population_losses``) for SPSA."""

    def __init__(
        self,
        backbone: HFTextBackbone,
        num_classes: int,
        rank: int,
        template: str = "{text}",
        seed: int = 0,
    ) -> None:
        super().__init__(backbone)
        generator = torch.Generator().manual_seed(seed)
        hidden = backbone.hidden_size
        self.black_box = BlackBoxEncoder(backbone)
        self.surgery = InputSurgery(hidden, rank, generator)
        self.remap = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.remap.weight.copy_(torch.eye(hidden))
            self.remap.bias.zero_()
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, hidden, generator=generator) / hidden**0.5)
            self.head.bias.zero_()
        self._prefix, self._suffix = template_affixes(template, False, None)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise fixed inputs once: right-padded ``input_ids`` and ``attention_mask`` [N, L]."""
        ids = self.backbone.tokenize(texts, self._prefix, self._suffix)
        input_ids, attention_mask = pad_right(ids, self.backbone.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def features(self, batch: Batch, surgery: torch.Tensor | None = None) -> torch.Tensor:
        """The black box's output embeddings [B, h] of the batch after input surgery (constants)."""
        with torch.no_grad():
            embeds = self.backbone.embed(batch["input_ids"])
            transformed = self.surgery.apply(embeds, None if surgery is None else surgery.to(embeds.device))
        return self.black_box.encode(transformed, batch["attention_mask"])

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] of black-box features: the personal head on the re-mapped features."""
        return self.head(self.remap(features.to(self.head.weight.device)))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.classify(self.features(batch))

    def population_losses(self, candidates: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy [P] of each candidate surgery vector [P, n] on the batch (the re-mapping
        and head as they are)."""
        with torch.no_grad():
            return torch.stack(
                [
                    F.cross_entropy(self.classify(self.features(batch, c)).float(), batch["labels"])
                    for c in candidates
                ]
            )
