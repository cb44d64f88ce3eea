"""FedPepTAO's layer scores (Che et al. 2023): how much each layer's prompt matters, from the
correlation of the frozen model's outputs across examples, with no prompt and no training.

For one layer and a batch of B examples, the layer's output for each example is flattened over
its attended positions into a vector, K is the B × B matrix of cosine similarities between the
examples' vectors, and with λ_1..λ_B the eigenvalues of K (symmetric, positive semi-definite;
numerical negatives clamped at 0) and ε = 1e-5:

    score = Σ_j [log(λ_j + ε) + 1/(λ_j + ε)].

Each client scores every candidate layer on a batch of its own examples; the server weights the
clients' scores by their example counts and prompts the layers of highest score (not necessarily
contiguous). The reference code (llm-eff/FedPepTAO, ``run_getscore.py``) flattens the padded
outputs and leaves the last layer unscored; here padding positions are zeroed first and every
candidate layer is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPSILON = 1e-5


def layer_score(hidden: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The score of one layer from its outputs ``hidden`` [B, T, h] for a batch (``attention_mask``
    [B, T]: the attended positions), computed in float64."""
    if hidden.dim() != 3 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"layer outputs {tuple(hidden.shape)} do not match the attention mask "
            f"{tuple(attention_mask.shape)}"
        )
    if hidden.shape[0] < 2:
        raise ValueError("a layer score compares examples: it needs a batch of at least 2")
    vectors = (hidden.detach().double() * attention_mask.unsqueeze(-1).double()).reshape(hidden.shape[0], -1)
    unit = F.normalize(vectors, dim=1)
    similarity = unit @ unit.T
    eigenvalues = torch.linalg.eigvalsh((similarity + similarity.T) / 2).clamp(min=0) + EPSILON
    return float((eigenvalues.log() + eigenvalues.reciprocal()).sum())


def consensus_scores(scores: Sequence[Sequence[float]], weights: Sequence[float]) -> torch.Tensor:
    """The server's score of each layer: Σ_c w_c · score_c with w_c = n_c / Σ n (float64)."""
    if len(scores) != len(weights) or not scores:
        raise ValueError(f"{len(scores)} clients' scores with {len(weights)} weights")
    table = torch.tensor([list(s) for s in scores], dtype=torch.float64)
    w = torch.tensor(list(weights), dtype=torch.float64)
    if not bool((w > 0).all()):
        raise ValueError("client weights must be positive")
    return (w / w.sum()) @ table


def top_layers(scores: torch.Tensor, candidates: Sequence[int], count: int) -> list[int]:
    """The ``count`` candidate layers of highest score, in ascending layer order (ties: the lower
    layer first)."""
    if len(candidates) != scores.numel():
        raise ValueError(f"{scores.numel()} scores for {len(candidates)} candidate layers")
    if not 1 <= count <= len(candidates):
        raise ValueError(f"cannot select {count} of {len(candidates)} layers")
    order = sorted(range(len(candidates)), key=lambda i: (-float(scores[i]), candidates[i]))
    return sorted(candidates[i] for i in order[:count])
