"""The ``strategy`` section: one configuration class per aggregation rule, each declaring what its
strategy can do (``StrategySettings``), which the cross-section checks (``fedprompt.config_checks``)
read instead of lists of kind names."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from functools import reduce
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from fedprompt.config_base import StrictModel


class StrategySettings(StrictModel):
    """A strategy's configuration and what its strategy declares it can do. The cross-section
    checks (``fedprompt.config_checks``) read these declarations, never lists of kind names, so a new
    strategy states its needs here, beside its settings."""

    each_update: ClassVar[str | None] = None
    """What of each single client update the server step reads (None: the weighted mean of the
    updates is all it needs, which is all secure aggregation reveals)."""
    gradient_steps: ClassVar[str | None] = None
    """What the strategy does to the clients' gradient steps (None: it works with any local
    optimiser; otherwise black-box optimisers, which take no gradient steps, are refused)."""
    steps_as_sgd: ClassVar[str | None] = None
    """Why the strategy reads the local steps as plain SGD's with one learning rate and momentum
    (None: any gradient optimiser)."""
    needs_optimizer: ClassVar[tuple[str, str] | None] = None
    """(optimizer.kind, why) when the strategy works with one local optimiser only."""
    sent_beside_prompt: ClassVar[str | None] = None
    """What clients send beside the prompt tensors, which local differential privacy does not
    noise (None: the prompt tensors alone, so local DP protects the whole upload)."""
    dp_fedavg: ClassVar[bool] = False
    """Whether central DP may stand in for the server step: DP-FedAvg's noised uniform mean of the
    clipped deltas replaces the strategy's mean (FedAvg, and FedProx, whose server is FedAvg's)."""
    personal_prompts: ClassVar[bool] = False
    """Whether each client keeps a whole personal prompt (so no split prompt goes beside it)."""
    prompt_kind: ClassVar[str | None] = None
    """The one ``prompt.kind`` whose state the strategy aggregates (None: any prompt), which in turn
    is aggregated by this strategy only."""
    needs_domains: ClassVar[str | None] = None
    """Why the strategy needs clients that each hold one domain (``partition.kind: domains``)."""
    one_momentum: ClassVar[str | None] = None
    """Why the strategy reads every local step with the optimiser's one momentum (None: it does not),
    so prompt parts with momenta of their own (twin and VQA prompts) are refused with it."""
    drift_state: ClassVar[str | None] = None
    """What a client keeps from its own unclipped local update (None: nothing). A norm bound applied
    afterwards (``robustness.max_update_norm`` on the server, local DP's clipping) would make the
    server's view of the update differ from the client's, so both are refused with it."""
    optimizer_defaults: ClassVar[Mapping[str, Any]] = {}
    """The local gradient optimiser's settings of the strategy's paper, applied to the fields of
    the ``optimizer`` section the configuration leaves unset (a setting given explicitly stays, and
    the run says at start that it departs from the paper)."""


class FedAvgConfig(StrategySettings):
    """Average of client states, weighted by their example counts or uniform."""

    dp_fedavg = True

    kind: Literal["fedavg"] = "fedavg"
    weighting: Literal["examples", "uniform"] = Field(
        "examples",
        description="examples: w_k = n_k (FedAvg); uniform: every client counts once (FedTPG's and "
        "PromptFL's reference code).",
    )
    server_lr: float = Field(
        1.0, gt=0, description="η_g, the server's step along the average update: θ ← θ + η·(average − θ)."
    )


class FedProxConfig(StrategySettings):
    """FedAvg on the server; clients add (mu/2)·||θ - θ_global||² to their loss."""

    gradient_steps = "adds a gradient term to the clients' loss"
    dp_fedavg = True

    kind: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0)


class FedOptConfig(StrategySettings):
    """Server optimiser on the pseudo-gradient (FedAdam, FedYogi, FedAdagrad)."""

    kind: Literal["fedadam", "fedyogi", "fedadagrad"] = "fedadam"
    server_lr: float = Field(1e-2, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class MedianConfig(StrategySettings):
    """Coordinate-wise median."""

    each_update = "the coordinate-wise median of the updates"

    kind: Literal["median"] = "median"


class TrimmedMeanConfig(StrategySettings):
    """Coordinate-wise mean after dropping the `beta` largest and smallest shares."""

    each_update = "the coordinate-wise order of the updates"

    kind: Literal["trimmed-mean"] = "trimmed-mean"
    beta: float = Field(0.1, ge=0, lt=0.5)


class KrumConfig(StrategySettings):
    """Krum: the update closest to its n - f - 2 nearest neighbours; Multi-Krum: the mean of the
    `keep` closest."""

    each_update = "the distances between the updates"

    kind: Literal["krum"] = "krum"
    num_byzantine: int = Field(0, ge=0, description="f, the number of clients that may be adversarial.")
    keep: int = Field(1, ge=1, description="m: 1 is Krum; more averages the m best-scored (Multi-Krum).")


class GeometricMedianConfig(StrategySettings):
    """RFA: the (example-weighted) geometric median of the client states, by smoothed Weiszfeld."""

    each_update = "the distances between the updates"

    kind: Literal["geometric-median"] = "geometric-median"
    iterations: int = Field(
        100, ge=1, description="Most Weiszfeld iterations, from the coordinate-wise median (RFA: 3-10)."
    )
    ftol: float = Field(1e-6, ge=0, description="Stop once the objective falls by less than this share.")
    nu: float = Field(1e-6, gt=0, description="ν, the smoothing: no distance counts as less than it.")
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="α_k: by example count (RFA), or 1/K (a client can claim any count)."
    )


class FedBPTConfig(StrategySettings):
    """FedBPT: clients search z by CMA-ES from the server's mean and σ; the server aggregates.

    rule ``cma`` (the reference's): one global CMA-ES is told every client's final mean and its local
    loss as injected solutions (repaired as pycma repairs solutions it did not sample), from the
    step size σ_g the clients' local step sizes give; the σ sent down is then scaled by the global
    CMA-ES's step-size change, σ ← max(sigma_floor, σ · σ_after/σ_g). rule ``mean``: the
    example-weighted mean of the clients' z; σ ← max(sigma_floor, min(σ, the clients' RMS final σ)).
    A client's report is rejected when its loss is not in [0, max_loss] or its step sizes are not
    within a factor max_sigma_ratio of the σ it was sent. ``sigma_decay`` < 1 is a σ schedule on top
    of either rule: each aggregated round also multiplies the σ sent down by it (never below
    sigma_floor), so late rounds search closer to the global z.
    """

    each_update = "each client's CMA-ES search state and losses (its CMA rule)"
    needs_optimizer = ("cmaes", "aggregates CMA-ES searches")
    sent_beside_prompt = "CMA-ES losses"

    kind: Literal["fedbpt"] = "fedbpt"
    rule: Literal["cma", "mean"] = "cma"
    sigma_floor: float = Field(
        0.5, ge=0, description="Lowest step size sent to clients (0.5 as the reference intends; 0: none)."
    )
    max_loss: float = Field(
        100.0, gt=0, description="Largest local cross-entropy a client may report (p = e^-100 for its class)."
    )
    max_sigma_ratio: float = Field(
        10.0,
        gt=1,
        description="A client's final σ and √(Σ_t σ_t²/μ) must lie within this factor of the σ it was sent "
        "(honest: about √(generations/μ), 2 in the reference's setting).",
    )
    sigma_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="σ schedule: each aggregated round multiplies the σ sent down by this factor, after the "
        "rule and never below sigma_floor (1: no schedule, the reference's).",
    )


class ReliabilityConfig(StrategySettings):
    """Reliability-weighted personalised aggregation (prompt-based personalised FL for medical VQA).

    Each client keeps its own prompt p_t. The server sends client t the shared prompt
    p_t^s = Σ_{i≠t} η_i p_i, η_i ∝ acc_i · max(0, cos(p_i, p_t)) over the other clients' last
    prompts (acc_i: their reported validation accuracy), and the client adds
    α · (1 − cos(p_t, p_t^s)) to its loss. The global prompt (the server's evaluation) is the
    mean of the clients' prompts weighted by acc_i · (mean clipped cosine to the others).
    The cosines read the prompt tensors only (context vectors, visual tokens, pixel prompts; for
    prompt.kind vqa-twin question.context, answer.context and image.*), never a network beside
    them; with ``personalization.local: ["fusion.*"]`` the VQA fusion head stays on each client
    and only the prompts travel. A head that travels is pulled by its own cosine term, with
    weight ``head_alpha``, toward the same mix.
    """

    each_update = "each client's prompt and its agreement with the others"
    sent_beside_prompt = "validation accuracy"
    personal_prompts = True

    kind: Literal["reliability"] = "reliability"
    alpha: float = Field(1.0, ge=0, description="α, the weight of the pull toward the shared prompt.")
    head_alpha: float = Field(
        0.0,
        ge=0,
        description="α_h, the weight of a second pull, α_h · (1 − cos), on the tensors that travel but are "
        "not prompts (the VQA fusion head when personalization.local does not keep it) toward the same "
        "η-weighted mix of the other clients' (0: they are trained by each client alone, like a local head).",
    )


class FedDPTConfig(StrategySettings):
    """Fed-DPT's aggregation (Wei et al.): domain d's text prompt on the server is the mean of its
    own clients' (the domain-d row of their uploads; unchanged in a round without them), never
    averaged across domains; the visual prompt tokens are averaged over all clients. A client
    trains from its own domain's prompt as the server has it and holds a copy of the other domains'
    prompts that follows the server's by momentum, E ← α·E + (1 − α)·S at the start of each of its
    rounds (the paper's momentum update of the external prompts, against their sudden change when
    reloaded); the copy is client state, checkpointed and resumed with the run.
    """

    each_update = "each client's own domain's text prompt"
    prompt_kind = "fed-dpt"
    needs_domains = "keeps a text prompt per domain, trained by that domain's clients"

    kind: Literal["fed-dpt"] = "fed-dpt"
    momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="α, the momentum of a client's copy of the other domains' prompts (0: the server's as "
        "they are).",
    )
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="Each client's weight in its domain's mean and in the visual tokens' mean."
    )


class FedKSeedConfig(StrategySettings):
    """FedKSeed (Qin et al. 2024): zeroth-order steps along a shared pool of K seeds; clients send
    (seed index, projected gradient ĝ) pairs instead of the prompt, and every party rebuilds the
    prompt by replaying them: θ ← θ − η·w_k·ĝ·u(seed), the clients' pairs in client-id order, each
    client's in step order, w_k its aggregation weight. Needs optimizer.kind spsa (η = optimizer.lr,
    ε = optimizer.epsilon; the paper's ε is 5e-4), a round of budget // (2·batch_size) steps. The
    directions are a specified NumPy PCG64 stream, and each round a client checks a fingerprint of
    the first ones against the server's before it steps. ``seed_sampling: importance`` is
    FedKSeed-Pro.
    """

    each_update = "each client's (seed, projected gradient) pairs"
    needs_optimizer = ("spsa", "replays SPSA steps")
    sent_beside_prompt = "seed-gradient pairs"

    kind: Literal["fedkseed"] = "fedkseed"
    num_seeds: int = Field(
        4096, ge=1, le=2**24, description="K, the seeds in the shared pool (the paper's 4096)."
    )
    weighting: Literal["examples", "equal"] = Field(
        "examples", description="A client's weight w_k in the replay: by its example count, or 1/(clients)."
    )
    max_projected_grad: float = Field(
        1000.0,
        gt=0,
        description="Largest |ĝ| the server accepts; a client skips (sends ĝ = 0 for) a step above it, as "
        "the reference's loss-gap clip does.",
    )
    downlink: Literal["prompt", "seed-pool"] = Field(
        "prompt",
        description="What clients are sent: the global prompt, or the K accumulated ĝ per seed since "
        "round 0, from which every client replays the prompt (the paper's downlink: 4·K bytes whatever "
        "the prompt).",
    )
    seed_sampling: Literal["uniform", "importance"] = Field(
        "uniform",
        description="How clients draw their seeds from the pool: uniformly (FedKSeed), or FedKSeed-Pro's "
        "probability-differentiated sampling, p = softmax(min-max-normalised mean |ĝ| of each seed so "
        "far), which the server sends down each round (4·K bytes more).",
    )


class ScaffoldConfig(StrategySettings):
    """SCAFFOLD (option II): server and client control variates, the size of the prompt, correct
    each client's local gradient (g + c − c_i); they travel with the prompt both ways. Clients
    train by SGD (`optimizer.algorithm: sgd`); unless the configuration sets them, the paper's
    plain SGD steps: `optimizer.momentum: 0` and `optimizer.grad_clip: null` (a clip would act on
    g + c − c_i, momentum accumulates the correction)."""

    each_update = "each client's control-variate update beside its prompt"
    gradient_steps = "corrects or counts the clients' gradient steps"
    steps_as_sgd = (
        "its control-variate update c_i + (x − y_i)/(K·η_l) − c reads the local steps as η_l times the "
        "corrected gradient, which AdamW's per-coordinate scaling breaks"
    )
    sent_beside_prompt = "control variates"
    drift_state = "its control variate c_i⁺ = c_i − c + (x − y_i)/(K·η_l), from its unclipped y_i"
    optimizer_defaults: ClassVar[Mapping[str, Any]] = {"momentum": 0.0, "grad_clip": None}

    kind: Literal["scaffold"] = "scaffold"
    server_lr: float = Field(1.0, gt=0, description="η_g: x ← x + η_g·(weighted mean of y_i − x).")


class FedDynConfig(StrategySettings):
    """FedDyn: each client adds −⟨g_k, θ⟩ + (α/2)‖θ − θ_server‖² to its loss (g_k carried from round to
    round); the server keeps h and sends mean(θ_k) − h/α."""

    each_update = "each client's prompt for its dynamic regulariser's state"
    gradient_steps = "corrects or counts the clients' gradient steps"
    drift_state = "its linear term g_k ← g_k − α(θ_k − θ), from its unclipped θ_k"

    kind: Literal["feddyn"] = "feddyn"
    alpha: float = Field(0.01, gt=0, description="α, the dynamic regulariser's weight (paper: 0.01-0.1).")


class FedAvgMConfig(StrategySettings):
    """Server momentum: v ← β·v + Δ, θ ← θ + η·v, with Δ the example-weighted average update."""

    kind: Literal["fedavgm"] = "fedavgm"
    server_lr: float = Field(1.0, gt=0, description="η, the server learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="β, the server momentum.")


class FedNovaConfig(StrategySettings):
    """FedNova: each client's update is divided by its a_i (from its local steps and the SGD
    momentum) and the average rescaled by τ_eff = Σ p_i a_i."""

    each_update = "each client's local step count"
    gradient_steps = "corrects or counts the clients' gradient steps"
    sent_beside_prompt = "step counts"
    one_momentum = "its a_i = [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ) reads a client's steps with one momentum ρ"

    kind: Literal["fednova"] = "fednova"


class FedPepTAOConfig(StrategySettings):
    """FedPepTAO's adaptive optimisation: clients train by AdamW whose moments persist across rounds
    (client state); the server corrects each client's drift with control variates it keeps itself
    (c_i = the client's mean step direction, (θ − θ_i)/(τ_i·η_l)), θ̃ = FedAvg − Σ w_i τ_i η_l (c − c_i),
    then steps with momentum: v ← β·v + (1 − β)(θ − θ̃), θ ← θ̃ − η_s·v, η_s decaying by `server_lr_decay`
    each round down to `min_server_lr`. Pair it with `prompt.select_layers` (FedPepTAO's layer choice)."""

    each_update = "each client's prompt and step count (its control variate)"
    gradient_steps = "counts the clients' gradient steps"
    sent_beside_prompt = "step counts"
    optimizer_defaults: ClassVar[Mapping[str, Any]] = {"keep_state": True}

    kind: Literal["fedpeptao"] = "fedpeptao"
    server_lr: float = Field(
        1.0, ge=0, description="η_0, the server's first learning rate (0: FedAvg + correction)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="β, the server momentum (the reference's 0.9).")
    server_lr_decay: float = Field(
        0.99, gt=0, le=1, description="η_s ← η_s · decay every round (the reference's 0.99)."
    )
    min_server_lr: float = Field(1e-4, ge=0, description="The floor of η_s (the reference's 1e-4).")
    drift_correction: bool = Field(
        True, description="The server's control variates; false: momentum on the plain FedAvg average."
    )


STRATEGY_CONFIGS: tuple[type[StrategySettings], ...] = (
    FedAvgConfig,
    FedProxConfig,
    FedOptConfig,
    MedianConfig,
    TrimmedMeanConfig,
    KrumConfig,
    GeometricMedianConfig,
    FedBPTConfig,
    ReliabilityConfig,
    FedDPTConfig,
    FedKSeedConfig,
    ScaffoldConfig,
    FedDynConfig,
    FedAvgMConfig,
    FedNovaConfig,
    FedPepTAOConfig,
)
"""Every strategy configuration, one per ``strategy.kind`` (FedOpt's three kinds share one)."""

StrategyConfig = Annotated[reduce(operator.or_, STRATEGY_CONFIGS), Field(discriminator="kind")]
