"""FeS's pseudo-labelling (Cai et al., "Federated Few-Shot Learning for Mobile NLP"; reference
UbiquitousLearning/FeS): few-shot clients label their unlabelled examples with the global prompt,
admit the confident ones at the pace of a curriculum, and train on them beside their labels.

The pure parts are here and tested by hand: the curriculum's count per round, the admission of
pseudo-labels (confidence threshold, per-class quotas in the proportions of the labelled
examples, a draw in proportion to confidence), and vote-k's choice of representationally diverse
candidates (Su et al. 2022, "Selective Annotation Makes Language Models Better Few-Shot
Learners", as FeS applies it). ``PseudoLabelTrainer`` runs them in a client's local round. Nothing
here leaves the client: the pseudo-labels live for one local round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedprompt.config import PseudoLabelConfig
from fedprompt.seeding import derive_seed
from fedprompt.training.batching import TensorData
from fedprompt.training.co_planning import PlannerRecords, candidates, layer_passes
from fedprompt.training.gradient import GradientTrainer, LocalRound
from optimizers.base import OptimizationStats
from prompt_modules.base import PromptModule
from prompt_modules.soft_prompt import LayeredPrompt
from prompt_modules.text_classifier import LAYER_INPUT

UNLABELLED = -1
"""The label an unlabelled example carries (its true label is not on the client)."""


def pacing_count(round_num: int, candidates: int, pace: float, pacing: str) -> int:
    """How many pseudo-labels round ``round_num`` (from 1) admits of ``candidates``:
    min(⌊pace·r·U⌋, U) for the curriculum, min(⌊pace·U⌋, U) when fixed."""
    if round_num < 1 or candidates < 0:
        raise ValueError(f"rounds count from 1 and candidates from 0; got round {round_num}, {candidates}")
    steps = round_num if pacing == "curriculum" else 1
    return min(math.floor(pace * steps * candidates + 1e-9), candidates)


@dataclass(frozen=True)
class PseudoLabels:
    """The unlabelled examples a round admits (positions in the candidates, ascending), their
    pseudo-labels, and their confidences."""

    indices: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


def select_pseudo_labels(
    probabilities: torch.Tensor,
    round_num: int,
    labelled_counts: Sequence[int],
    config: PseudoLabelConfig,
    rng: np.random.Generator,
) -> PseudoLabels:
    """Admit pseudo-labels from the candidates' class probabilities [U, C]: n_r = the curriculum's
    count, class c's quota ⌊n_r · l_c / Σ l⌋ (l: the client's labelled examples per class), filled
    from the candidates predicted c with probability ≥ threshold, drawn without replacement in
    proportion to that probability (all of them when fewer)."""
    probs = probabilities.detach().to("cpu", torch.float64)
    if probs.dim() != 2 or probs.shape[1] != len(labelled_counts):
        raise ValueError(f"probabilities {tuple(probs.shape)} for {len(labelled_counts)} classes")
    total = sum(labelled_counts)
    if total < 1:
        raise ValueError("pseudo-labelling needs at least one labelled example to set the class proportions")
    confidence, predicted = probs.max(1)
    confidence, predicted = confidence.numpy(), predicted.numpy()
    count = pacing_count(round_num, probs.shape[0], config.pace, config.pacing)
    chosen: list[np.ndarray] = []
    for label, labelled in enumerate(labelled_counts):
        quota = math.floor(count * labelled / total + 1e-9)
        eligible = np.flatnonzero((predicted == label) & (confidence >= config.threshold))
        if quota == 0 or len(eligible) == 0:
            continue
        if len(eligible) <= quota:
            chosen.append(eligible)
            continue
        weights = confidence[eligible] / confidence[eligible].sum()
        chosen.append(rng.choice(eligible, size=quota, replace=False, p=weights))
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return PseudoLabels(indices, predicted[indices], confidence[indices])


def diverse_subset(features: torch.Tensor, count: int, neighbours: int) -> np.ndarray:
    """vote-k: ``count`` of the examples with features [U, h], chosen for representational diversity.

    Features are centred and compared by cosine; each example votes for its ``neighbours`` most
    similar others. Greedily, the example whose voters count most is taken, a voter counting
    10^(−t) once t of the examples it voted for were taken, so later picks move away from covered
    regions. Ties go to the lower index. Returns the chosen positions, ascending."""
    n = features.shape[0]
    if not 0 <= count <= n:
        raise ValueError(f"cannot choose {count} of {n} examples")
    x = features.detach().to("cpu", torch.float64)
    x = x - x.mean(0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    similarity = (x @ x.T).numpy()
    np.fill_diagonal(similarity, -np.inf)
    k = min(neighbours, n - 1)
    voters: list[list[int]] = [[] for _ in range(n)]
    if k > 0:
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        for voter, targets in enumerate(nearest):
            for target in targets:
                voters[int(target)].append(voter)
    covered = np.zeros(n, dtype=np.int64)  # t: how many of a voter's choices were taken
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    for _ in range(count):
        scores = np.array([sum(10.0 ** -covered[v] for v in voters[i]) for i in range(n)])
        scores[taken] = -np.inf
        pick = int(np.argmax(scores))
        order.append(pick)
        taken[pick] = True
        for voter in voters[pick]:
            covered[voter] += 1
    return np.sort(np.array(order, dtype=np.int64))


def labelled_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """The number of labelled examples of each class."""
    known = labels[labels != UNLABELLED]
    return torch.bincount(known.cpu(), minlength=num_classes).tolist()


class PseudoLabelTrainer(GradientTrainer):
    """Owns a client's FeS round: labels its unlabelled candidates (``LocalRound.unlabelled``) with
    the global prompt it starts from (eval mode, no gradients), admits pseudo-labels by
    ``select_pseudo_labels`` (seeded by the round's seed) and trains by gradient on its labelled
    examples and the admitted ones together. Reports how many it admitted and their mean
    confidence; the pseudo-labels themselves go nowhere.

    With ``co_planning`` the round first plans (``fedprompt.training.co_planning``): it scores the
    received prompt on the labelled examples, credits its previous plan with the gain, picks this
    round's depth and capacity, trains only the top ``depth`` layers of the deep prompt (the others
    come back bit for bit as they started) at pace ``capacity``, and carries its records forward;
    it reports the plan (``plan_depth``, ``plan_capacity``, ``plan_cost``, ``plan_score`` and, from
    its second round, ``plan_gain``)."""

    def __init__(self, *args, pseudo: PseudoLabelConfig, eval_batch_size: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pseudo = pseudo
        self.eval_batch_size = eval_batch_size

    def train(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        if self.pseudo.co_planning is not None:
            return self._co_planned(model, data, local)
        return self._train_with(model, data, local, self.pseudo)

    def _train_with(
        self, model: PromptModule, data: TensorData, local: LocalRound, pseudo: PseudoLabelConfig
    ) -> OptimizationStats:
        unlabelled = local.unlabelled
        if unlabelled is None or len(unlabelled) == 0:
            return super().train(model, data, local)
        probabilities = self._predict(model, unlabelled)
        rng = np.random.default_rng(derive_seed(local.instructions.seed, "pseudo-labels"))
        counts = labelled_counts(data.labels, probabilities.shape[1])
        chosen = select_pseudo_labels(probabilities, local.instructions.round, counts, pseudo, rng)
        combined = data
        if len(chosen.indices):
            admitted = unlabelled.subset(chosen.indices)
            admitted.tensors["labels"] = torch.as_tensor(chosen.labels, dtype=torch.long)
            combined = data.concat(admitted)
        stats = super().train(model, combined, local)
        stats.extra["pseudo_labels"] = float(len(chosen.indices))
        if len(chosen.indices):
            stats.extra["pseudo_label_confidence"] = float(chosen.confidence.mean())
        return stats

    def _co_planned(self, model: PromptModule, data: TensorData, local: LocalRound) -> OptimizationStats:
        assert self.pseudo.co_planning is not None
        prompt = getattr(model, "prompt", None)
        if not isinstance(prompt, LayeredPrompt):
            raise TypeError(
                f"co-planning trains a deep prompt's top layers; this model's prompt is {prompt!r}"
            )
        grid = candidates(self.pseudo.co_planning)
        layers = prompt.prompted_layers
        if max(plan.depth for plan in grid) > len(layers):
            raise ValueError(
                f"co-planning depths {self.pseudo.co_planning.depths} exceed the {len(layers)} layers"
            )
        records = PlannerRecords.from_state(local.carried, len(grid))
        score = self._soft_accuracy(model, data)
        gain = records.observe(score)
        choice = records.choose()
        plan = grid[choice]
        held = len(layers) - plan.depth
        start = prompt.layer_parameter.detach().clone()
        prompt.held_layers = held
        try:
            stats = self._train_with(
                model, data, local, self.pseudo.model_copy(update={"pace": plan.capacity})
            )
        finally:
            prompt.held_layers = 0
        with torch.no_grad():
            prompt.layer_parameter[:held].copy_(start[:held])  # weight decay and kept moments move them too
        num_layers = model.backbone.num_layers
        forward = num_layers - (getattr(model, "cached_layer", 0) if LAYER_INPUT in data.tensors else 0)
        annotated = 0 if local.unlabelled is None else len(local.unlabelled)
        cost = layer_passes(annotated + len(data), stats.examples, forward, num_layers - layers[held])
        records.begin(choice, score, cost)
        local.carry_out.update(records.to_state())
        stats.extra.update(
            {
                "plan_depth": float(plan.depth),
                "plan_capacity": plan.capacity,
                "plan_cost": cost,
                "plan_score": score,
            }
        )
        if gain is not None:
            stats.extra["plan_gain"] = gain
        return stats

    @torch.inference_mode()
    def _soft_accuracy(self, model: PromptModule, data: TensorData) -> float:
        """The mean probability the loaded prompt gives each labelled example's label (float64)."""
        model.eval()
        total = 0.0
        for batch in data.batches(self.eval_batch_size, device=self.device):
            probabilities = model(batch).double().softmax(-1)
            total += float(probabilities.gather(1, batch["labels"].view(-1, 1)).sum())
        return total / len(data)

    @torch.inference_mode()
    def _predict(self, model: PromptModule, unlabelled: TensorData) -> torch.Tensor:
        model.eval()
        probabilities = [
            model(batch).float().softmax(-1).cpu()
            for batch in unlabelled.batches(self.eval_batch_size, device=self.device)
        ]
        return torch.cat(probabilities)
