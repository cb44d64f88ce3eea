"""BDPL's local training of a discrete prompt (Diao et al., TMLR 2023): a categorical distribution
per prompt position over a candidate vocabulary, stepped along a variance-reduced policy gradient
estimated from the losses of sampled prompts. It needs text in and label log-probabilities out.

One step, with p_i the distribution of position i (n positions, K candidates) and I samples:

1. draw prompts s_1..s_I, s_{k,i} ~ p_i independently (seeded by the round's seed);
2. score each on the same fresh batch of local examples: L_k, the mean cross-entropy of the
   classes' label-word log-probabilities;
3. g = (1/(I−1)) Σ_k (L_k − L̄) ∇ log P(s_k), L̄ the mean of the L_k (the baseline that makes the
   estimate variance-reduced and leaves it unbiased), with, per position i and candidate j:
   - ``softmax`` (p_i = softmax(α_i), the trained state α): ∂ log p_{i,s}/∂α_{i,j} = [j = s] − p_{i,j};
   - ``simplex`` (the trained state is p itself, as BDPL's and FedOne's reference code keep it):
     the reference's derivative +1/p_{i,j} for the sampled candidate and −1/p_{i,j} for the others
     (its default, "negative"; since Σ_k (L_k − L̄) = 0 the −1/p part cancels, so this is twice
     the score function ∂ log p_{i,s}/∂p_{i,j} = [j = s]/p_{i,j});
4. clip g to L2 norm ``grad_clip`` over all positions (the reference's 3), step the state by Adam
   (the reference's AdamW, here fresh each round) or plain gradient descent; ``simplex`` then
   projects each row back onto the probability simplex (the exact Euclidean projection; the
   reference bisects for the same threshold to a tolerance of 1e-3).
"""

from __future__ import annotations

import math

import torch

from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import LocalRound, LocalTrainer
from optimizers.base import OptimizationStats, checked_losses
from prompt_modules.base import PromptModule
from prompt_modules.llm_classifier import DiscretePromptClassifier


def policy_gradient(
    weights: torch.Tensor, samples: torch.Tensor, losses: torch.Tensor, parametrization: str
) -> torch.Tensor:
    """BDPL's variance-reduced estimate [n, K] (float64) of the gradient of the expected loss with
    respect to the state ``weights`` (logits α, or probabilities p), from ``samples`` [I, n] (one
    candidate index per position) and their ``losses`` [I] (see the module docstring)."""
    count, positions = samples.shape
    if count < 2 or losses.shape != (count,) or weights.shape[0] != positions:
        raise ValueError(
            f"need I >= 2 samples [I, n={weights.shape[0]}] and I losses; got {tuple(samples.shape)} "
            f"and {tuple(losses.shape)}"
        )
    weights = weights.detach().double()
    losses = losses.detach().double()
    advantage = (losses - losses.mean()) / (count - 1)
    chosen = torch.zeros(count, *weights.shape, dtype=torch.float64)
    chosen.scatter_(2, samples.long().unsqueeze(-1), 1.0)  # [I, n, K], 1 at each sampled candidate
    if parametrization == "softmax":
        score = chosen - torch.softmax(weights, dim=-1)
    elif parametrization == "simplex":
        # the reference's (2·[j = s] − 1)/p, its −1/p part summed over k first (Σ_k a_k = 0, so it
        # vanishes): 2·[j = s]/p, finite because a sampled candidate has p > 0
        sampled = (advantage[:, None, None] * chosen).sum(0)
        return torch.where(sampled != 0, 2 * sampled / weights.clamp(min=1e-300), torch.zeros_like(sampled))
    else:
        raise ValueError(f"parametrization must be 'softmax' or 'simplex', got {parametrization!r}")
    return torch.einsum("k,knj->nj", advantage, score)


def project_to_simplex(rows: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row onto the probability simplex {p ≥ 0, Σ p = 1}:
    max(p − τ, 0) with the threshold τ that makes the row sum to 1 (Held et al.; Duchi et al. 2008)."""
    values = rows.double()
    ordered, _ = torch.sort(values, dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    ranks = torch.arange(1, values.shape[-1] + 1, dtype=torch.float64)
    support = (ordered - cumulative / ranks) > 0
    last = support.long().cumsum(-1).argmax(-1, keepdim=True)  # the last index of the support
    tau = cumulative.gather(-1, last) / (last + 1).double()
    return (values - tau).clamp(min=0).to(rows.dtype)


class PolicyGradientTrainer(LocalTrainer):
    """Owns a client's BDPL round on a ``DiscretePromptClassifier``: ``steps`` steps of ``samples``
    prompts, each scored on the same fresh batch of ``batch_size`` local examples, the state
    stepped by Adam (fresh each round) or plain descent, clipped to ``grad_clip``."""

    def __init__(
        self,
        samples: int,
        lr: float,
        steps: int,
        batch_size: int,
        *,
        algorithm: str = "adam",
        weight_decay: float = 0.0,
        grad_clip: float | None = 3.0,
    ) -> None:
        if samples < 2 or steps < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(
                f"need samples >= 2, steps >= 1, batch_size >= 1, lr > 0; got {samples}, {steps}, "
                f"{batch_size}, {lr}"
            )
        if algorithm not in ("adam", "sgd"):
            raise ValueError(f"algorithm must be 'adam' or 'sgd', got {algorithm!r}")
        self.samples = samples
        self.lr = lr
        self.steps = steps
        self.batch_size = batch_size
        self.algorithm = algorithm
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        if local.penalty is not None:
            raise ValueError("BDPL steps a distribution by policy gradient; it cannot add a gradient term")
        if not isinstance(model, DiscretePromptClassifier):
            raise TypeError(f"BDPL trains a discrete prompt; got {type(model).__name__}")
        prompt = model.prompt
        weights = prompt.weights
        if self.algorithm == "adam":
            optimizer = torch.optim.AdamW([weights], lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD([weights], lr=self.lr)
        seed = local.instructions.seed
        rows = torch_generator(seed)
        draws = torch_generator(derive_seed(seed, "bdpl-samples"))
        size = min(self.batch_size, len(data))
        stats = OptimizationStats()
        loss_sum = 0.0
        model.eval()
        for step in range(self.steps):
            index = torch.randperm(len(data), generator=rows)[:size]
            batch = next(data.subset(index.numpy()).batches(size))
            probabilities = prompt.probabilities()
            samples = torch.multinomial(probabilities, self.samples, replacement=True, generator=draws).T
            with torch.no_grad():
                losses = checked_losses(
                    model.sample_losses(samples, batch), self.samples, f"BDPL step {step}"
                )
            gradient = policy_gradient(weights, samples, losses, prompt.parametrization)
            norm = float(gradient.norm())
            if self.grad_clip is not None and norm > self.grad_clip:
                gradient = gradient * (self.grad_clip / norm)
            optimizer.zero_grad(set_to_none=True)
            weights.grad = gradient.to(weights.dtype)
            optimizer.step()
            if prompt.parametrization == "simplex":
                with torch.no_grad():
                    weights.copy_(project_to_simplex(weights))
            stats.steps += 1
            stats.examples += size
            stats.queries += self.samples * size
            stats.final_loss = float(losses.mean())
            loss_sum += stats.final_loss
        stats.mean_loss = loss_sum / stats.steps
        final = prompt.probabilities()
        entropy = float(-(final * final.clamp(min=1e-300).log()).sum(-1).mean())
        stats.extra.update(
            {
                "mean_entropy": entropy,
                "entropy_share": entropy / math.log(final.shape[1]),
                "mean_top_probability": float(final.max(-1).values.mean()),
            }
        )
        return stats
