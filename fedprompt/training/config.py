"""Settings of local training: the local optimiser (``optimizer``: gradient, CMA-ES, SPSA) and its
learning-rate schedule, per-part optimiser settings of twin prompts, image augmentation, and where
a process computes (``runtime``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedprompt.config_base import StrictModel


class LRScheduleConfig(StrictModel):
    """How the clients' learning rate changes from round to round (constant within a round, the
    same for every client): a factor of `optimizer.lr` that is a pure function of the round."""

    kind: Literal["constant", "step", "exponential", "cosine"] = Field(
        "constant",
        description="step: ×gamma every `step_rounds` rounds; exponential: ×gamma every round; cosine: "
        "from lr down to `min_lr` over `rounds` rounds (torch's CosineAnnealingLR, per round).",
    )
    gamma: float = Field(0.5, gt=0, le=1, description="step/exponential: the decay factor.")
    step_rounds: int = Field(1, ge=1, description="step: rounds between two decays.")
    min_lr: float = Field(0.0, ge=0, description="cosine: the learning rate it decays to.")
    rounds: int | None = Field(
        None,
        ge=1,
        description="cosine: the rounds it spans; null: federation.rounds (so a resume that adds rounds "
        "stretches the rest of the cosine; pin it to keep the schedule).",
    )
    warmup_rounds: int = Field(
        0, ge=0, description="Rounds at the warmup learning rate first; the decay counts from after them."
    )
    warmup: Literal["constant", "linear"] = Field(
        "constant", description="constant: `warmup_lr` (CoOp); linear: from `warmup_lr` up to lr."
    )
    warmup_lr: float = Field(1e-5, gt=0, description="The warmup's learning rate (CoOp: 1e-5).")


class GradientOptimizerConfig(StrictModel):
    """Local training by gradient (torch optimisers; device and precision through accelerate)."""

    kind: Literal["gradient"] = "gradient"
    algorithm: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only.")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Cap on steps per round, whatever the epochs.")
    batch_size: int = Field(16, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    keep_state: bool = Field(
        False,
        description="Carry each client's optimiser state (AdamW's moments and step count, SGD's momentum) "
        "from round to round as client state, checkpointed and resumed (FedPepTAO's clients); false: a "
        "fresh optimiser every round, as FedAvg.",
    )
    schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)

    @model_validator(mode="after")
    def _schedule_below_lr(self) -> GradientOptimizerConfig:
        if self.schedule.min_lr > self.lr:
            raise ValueError(
                f"schedule.min_lr ({self.schedule.min_lr}) exceeds lr ({self.lr}); a cosine decays to min_lr"
            )
        return self


ScoreOn = Literal["batch", "local-set"]


SCORE_ON_HELP = (
    "batch: each generation/step scores its candidates on a fresh random batch of batch_size local "
    "examples; local-set: on the whole local training set (Black-Box Tuning, FedBPT), batch_size then "
    "only splits it into forward passes"
)


class CMAESOptimizerConfig(StrictModel):
    """Black-box local search over an intrinsic prompt's z by CMA-ES (nevergrad ParametrizedCMA).

    A round's length: ``budget`` in model queries per client, one query being one candidate scored
    on one example, so a round runs budget // (popsize · examples per candidate) generations; or a
    fixed number of ``generations`` (FedBPT's 8 local iterations), whatever they cost.
    """

    kind: Literal["cmaes"] = "cmaes"
    popsize: int = Field(10, ge=2, description="λ, candidates per generation (BBT: 20; FedBPT: 5).")
    sigma: float = Field(1.0, gt=0, description="Initial step size σ; with strategy fedbpt, the server's.")
    budget: int | None = Field(
        1280, ge=1, description="Model queries per client per round (null when `generations` is given)."
    )
    generations: int | None = Field(
        None, ge=1, description="Local generations per round whatever they cost (FedBPT: 8); replaces budget."
    )
    score_on: ScoreOn = Field("batch", description=SCORE_ON_HELP)
    batch_size: int = Field(32, ge=1, description="Examples scored per candidate in each generation.")
    chunk_size: int = Field(10, ge=1, description="Candidates per forward pass (local backbones).")

    @model_validator(mode="before")
    @classmethod
    def _generations_replace_the_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("generations") is not None and "budget" not in data:
            return {**data, "budget": None}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> CMAESOptimizerConfig:
        if (self.budget is None) == (self.generations is None):
            raise ValueError(
                "give the length of a local round as `budget` (model queries) or `generations`, not both"
            )
        return self


class SPSAOptimizerConfig(StrictModel):
    """Zeroth-order local search by SPSA: two seeded-perturbation queries per step (MeZO-style).

    Works on an intrinsic prompt's z (through one population call, also against a remote backbone)
    and on any text prompt whose parameters can be perturbed in place (soft and deep prompts on a
    local backbone: MeZO's case). Budget in model queries per client per round: each step scores
    2 candidates on ``batch_size`` examples (or on the whole local set).
    """

    kind: Literal["spsa"] = "spsa"
    lr: float = Field(1.0, gt=0, description="η in θ ← θ − η·ĝ·u.")
    epsilon: float = Field(0.1, gt=0, description="ε, the perturbation size in units of the prompt entries.")
    budget: int = Field(1280, ge=1, description="Model queries per client per round.")
    score_on: ScoreOn = Field("batch", description=SCORE_ON_HELP)
    batch_size: int = Field(32, ge=1, description="Examples scored per candidate in each step.")
    chunk_size: int = Field(
        2, ge=1, le=2, description="Candidates per forward pass of an intrinsic z (1: a loop, 2: stacked)."
    )


class PolicyGradientOptimizerConfig(StrictModel):
    """BDPL's local training of a discrete prompt: each step draws ``samples`` prompts from the
    positions' categorical distributions, scores each on the same fresh batch of ``batch_size``
    local examples (cross-entropy of the label words' log-probabilities), and steps the
    distributions along the variance-reduced policy gradient
    (1/(I−1)) Σ_k (L_k − L̄) ∇ log p(s_k). A step costs samples × batch_size model queries.
    """

    kind: Literal["bdpl"] = "bdpl"
    samples: int = Field(20, ge=2, description="I, prompts drawn per step (BDPL's sample_size: 20).")
    lr: float = Field(0.5, gt=0, description="Step size on the distributions (adam: its learning rate).")
    algorithm: Literal["adam", "sgd"] = Field(
        "adam", description="adam (the reference's AdamW, fresh each round) or plain gradient steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="adam: decoupled weight decay (reference: 0.1).")
    steps: int = Field(8, ge=1, description="Local steps per round, each on a fresh random batch.")
    batch_size: int = Field(16, ge=1, description="Examples every sampled prompt is scored on in a step.")
    grad_clip: float | None = Field(
        3.0, gt=0, description="Clip the gradient's L2 norm over all positions (reference: 3); null: none."
    )


OptimizerConfig = Annotated[
    GradientOptimizerConfig | CMAESOptimizerConfig | SPSAOptimizerConfig | PolicyGradientOptimizerConfig,
    Field(discriminator="kind"),
]

BLACK_BOX_OPTIMIZERS = (CMAESOptimizerConfig, SPSAOptimizerConfig, PolicyGradientOptimizerConfig)
"""The optimizer kinds that query the model for outputs only (no gradient through it)."""


class PartOptimizerConfig(StrictModel):
    """Optimiser settings of one part of a twin prompt; unset ones keep the `optimizer` section's."""

    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd only.")


class CoPlanningConfig(StrictModel):
    """FeS's co-planning of training depth and pseudo-label capacity for a deep prompt, on each
    client, each round. The candidates are every (depth, capacity) pair, depths outer: depth d trains
    the top d of the prompt's layers (the ones below are held at the values the round started from,
    bit for bit, and the backward pass stops above them); capacity c replaces `pace` (the round admits
    the curriculum's count at pace c). A client first tries each candidate once, in grid order; from
    then on it takes the one whose last try gained the most accuracy per unit of compute: the gain is
    the rise of the received global prompt's soft accuracy (mean probability of the true label) on
    its labelled examples from that round to the next, the compute the transformer-layer passes the
    round ran (annotation, scoring and training forward passes, backward passes counted twice). Ties
    go to the earlier candidate. The records are client state: checkpointed, resumed, never sent."""

    depths: list[int] = Field(
        min_length=1,
        description="Candidate training depths: how many of the deep prompt's top prompted layers "
        "train in a round (each from 1 to the number of prompted layers).",
    )
    capacities: list[float] = Field(
        min_length=1,
        description="Candidate pseudo-label capacities, each a pace in (0, 1]: the round admits "
        "min(⌊c·r·U⌋, U) pseudo-labels (curriculum) or ⌊c·U⌋ (fixed).",
    )

    @model_validator(mode="after")
    def _grid(self) -> CoPlanningConfig:
        if any(d < 1 for d in self.depths) or len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths must be distinct layer counts >= 1; got {self.depths}")
        if any(not 0 < c <= 1 for c in self.capacities) or len(set(self.capacities)) != len(self.capacities):
            raise ValueError(f"capacities must be distinct paces in (0, 1]; got {self.capacities}")
        return self


class PseudoLabelConfig(StrictModel):
    """FeS's pseudo-labelling (Cai et al., "Federated Few-Shot Learning for Mobile NLP"): each round a
    client labels its unlabelled examples with the global prompt it received and trains on its
    labelled examples and the pseudo-labelled ones it admits. Admitted: predictions whose probability
    is at least `threshold`, at most the curriculum's count for the round, n_r = min(⌊pace·r·U⌋, U)
    (`pacing: curriculum`, the paper's linear growth; `fixed`: ⌊pace·U⌋ every round), U the client's
    unlabelled candidates, split among the classes in the proportions of the client's labelled
    examples and drawn in proportion to their confidence. The candidates are the `diverse_fraction` of
    its unlabelled examples chosen for representational diversity (vote-k on the frozen model's
    sentence features, as the reference selects them), all of them when 1. Pseudo-labels never leave
    the client: only the trained prompt and counts do."""

    threshold: float = Field(
        0.0, ge=0, lt=1, description="Lowest predicted probability a pseudo-label is kept at."
    )
    pacing: Literal["curriculum", "fixed"] = Field(
        "curriculum", description="curriculum: n_r = ⌊pace·r·U⌋ (grows each round); fixed: ⌊pace·U⌋."
    )
    pace: float = Field(
        0.1, gt=0, le=1, description="The share of the candidates admitted per round of pacing."
    )
    diverse_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="The share of each client's unlabelled examples kept as candidates by vote-k.",
    )
    vote_neighbours: int = Field(
        150, ge=1, description="vote-k's k: each example votes for its k most similar (the reference's 150)."
    )
    co_planning: CoPlanningConfig | None = Field(
        None,
        description="FeS's co-planner: each round each client picks how many of a deep prompt's top "
        "layers train and how many pseudo-labels it admits, by accuracy gain per unit of compute "
        "(its capacities replace `pace`, which it does not read); null: every prompted layer trains "
        "at `pace`.",
    )


class AugmentConfig(StrictModel):
    """CoOp's training augmentation: a random resized crop (area share in ``crop_scale``, aspect
    ratio in [3/4, 4/3]) resized to the model's input, then a horizontal flip with probability 1/2.

    Text-side prompts (coop, generator) read cached image features: ``views`` augmented views of
    each training image are encoded once and cached, and each training step draws one of them
    per example. Visual prompts (vpt, pixel, twin), which run the image tower anyway, augment
    each batch on the fly. Evaluation always sees the plain images.
    """

    views: int = Field(8, ge=1, le=64, description="K, the augmented views cached per training image.")
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Range of the crop's share of the image area (CoOp: 0.08 to 1)."
    )
    flip: bool = Field(True, description="Flip horizontally with probability 1/2.")

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
        return self


class RuntimeConfig(StrictModel):
    """Where the process computes."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_batch_size: int = Field(64, ge=1)
    progress: bool = True
