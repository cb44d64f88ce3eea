"""Settings of the federation core: rounds and sampling (``federation``), bounds on what clients
send (``robustness``, ``payload``), split prompts (``personalization``) and secure aggregation."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from fedprompt.config_base import StrictModel, WireDtype


class AcceptanceConfig(StrictModel):
    """The server's acceptance test of each round's new global prompt on a held-out set it keeps.

    Before partitioning, ``held_out_per_class`` training examples of every class (a seeded choice)
    go to the server and to no client. After each aggregation the server scores the candidate
    global prompt on them and keeps it only when its score is no worse than the current global
    prompt's (within ``tolerance``); otherwise the round is skipped and the global prompt and every
    piece of server state (a FedBPT global CMA-ES, its σ) stay as they were. FedBPT at BBT's 50
    tokens drifts down after its best round; this is the guard against that drift.
    """

    held_out_per_class: int = Field(
        ge=1,
        description="Training examples per class the server keeps back (no client holds them) to score "
        "each candidate global prompt.",
    )
    score: Literal["loss", "accuracy"] = Field(
        "loss",
        description="loss: the mean cross-entropy on the held-out set (lower is better; smoother than "
        "accuracy on a small set); accuracy: the share classified right.",
    )
    tolerance: float = Field(
        0.0,
        ge=0,
        description="How much worse than the current global prompt's score a candidate's may be and "
        "still be accepted (in the score's units).",
    )


class FederationConfig(StrictModel):
    """Rounds and client sampling, and the server's acceptance test of each new global prompt."""

    rounds: int = Field(5, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients sampled each round.")
    min_clients: int = Field(2, ge=1, description="Fewest clients sampled in a round.")
    evaluate_every: int = Field(1, ge=1, description="Evaluate the global prompt every this many rounds.")
    local_evaluation: bool = Field(True, description="Also evaluate on each client's own held-out split.")
    acceptance: AcceptanceConfig | None = Field(
        None,
        description="Score each new global prompt on a held-out set the server keeps, and keep the "
        "previous one when the score gets worse (null: accept every aggregate).",
    )

    def clients_per_round(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients every round samples
        (``fedprompt.federation.sampling.sample_clients``): max(min_clients, ⌈fraction · N⌉), at most N."""
        return min(num_clients, max(self.min_clients, math.ceil(self.fraction * num_clients)))


class RobustnessConfig(StrictModel):
    """Bounds the server puts on every client update before any strategy sees it."""

    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="Clip each client's delta from the global prompt to this L2 norm (over all sent "
        "tensors); null: no bound. Differential privacy sets its own clipping norm.",
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        description="Cap on the example count (aggregation weight) a client may claim. In-process runs "
        "also bound each client by its known training-set size; on Flower this cap (and the size a "
        "site declared when it registered) is all the server knows.",
    )

    max_weight_ratio: float | None = Field(
        5.0,
        ge=1,
        description="A client whose training-set size the server does not know (every client on Flower; "
        "an in-process run knows its partitions) weighs at most this many times the median example "
        "count of its round's updates, whatever it declared or claims (beside n - 1 clients of the "
        "median count it then holds at most r / (r + n - 1) of the round's weight). null: no relative "
        "bound (a site may then outweigh all others by what it declares, up to max_examples).",
    )


class PersonalizationConfig(StrictModel):
    """Personal prompts: a split prompt whose local part never leaves its client, and the
    fine-tune-after-federation baseline."""

    local: list[str] = Field(
        default_factory=list,
        description="Prompt tensors kept whole on each client (shell patterns over the prompt state's "
        "names, e.g. 'image.*' for a twin prompt's visual side).",
    )
    shared_tokens: int | None = Field(
        None,
        ge=1,
        description="Token tensors (soft/deep prompts, CoOp context, VPT tokens) share their first k "
        "vectors and keep the rest on each client.",
    )
    finetune_steps: int | None = Field(
        None,
        ge=1,
        description="Also report each client's accuracy after this many local steps from the global "
        "prompt (fine-tune-after-federation), at every evaluation.",
    )

    @property
    def splits(self) -> bool:
        return bool(self.local) or self.shared_tokens is not None


class SecureAggregationConfig(StrictModel):
    """Secure aggregation (Flower runtime): the server learns only the weighted sum of the sampled
    clients' prompt updates, masked pairwise by the clients (``fedprompt.federation.secagg``)."""

    enabled: bool = False
    threshold: int | None = Field(
        None,
        ge=2,
        description="t: the fewest clients of a round whose shares unmask its sum (dropouts beyond n - t "
        "fail the round). null: a majority of the clients sampled per round, floor(n/2) + 1; more than "
        "n/2 either way.",
    )
    clip_range: float = Field(
        1.0,
        gt=0,
        description="Each client clips every coordinate of its delta from the global prompt to [-c, c] "
        "before quantisation (the server cannot clip what it never sees).",
    )
    bits: int = Field(
        32,
        ge=8,
        le=48,
        description="The ring Z_2^bits of the masked sums; each client's weighted delta gets "
        "(2^(bits-1) - 1) / n levels per side of [-c, c] (quantisation error c / (2 L) per coordinate).",
    )
    weights: Literal["uniform", "declared"] = Field(
        "uniform",
        description="Client weights, public before masking: uniform, or the example count each site "
        "declared when it registered (node config num-examples, capped by robustness.max_examples).",
    )

    min_survivors: int | None = Field(
        None,
        ge=2,
        description="A site's pin on the round size: the fewest clients whose inputs it lets be summed "
        "with its own. It refuses to take part in a round with fewer participants, and to help unmask "
        "fewer survivors. null: the threshold. Kept by each site; the server cannot override it.",
    )

    def threshold_for(self, sampled: int) -> int:
        """The threshold of a round that samples ``sampled`` clients."""
        return self.threshold if self.threshold is not None else sampled // 2 + 1


class PayloadConfig(StrictModel):
    """What crosses the wire: tensor dtype and the largest payload accepted."""

    wire_dtype: WireDtype = "float32"
    max_bytes: int = Field(64 * 2**20, ge=1024)
