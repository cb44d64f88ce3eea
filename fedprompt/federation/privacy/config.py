"""The ``privacy`` section: client-level differential privacy (central or local)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedprompt.config_base import StrictModel

LEGACY_NOISE_SEEDS = {"run": "reproducible-insecure", "secret": "system"}
"""``privacy.noise_seed`` values of earlier releases -> what they mean now."""


class AdaptiveClippingConfig(StrictModel):
    """Adaptive clipping (Andrew et al. 2021): the clipping norm C follows a quantile of the
    clients' update norms, C ← C·exp(−η·(b̃ − γ)), b̃ the share of updates within C estimated from a
    noised count. Its noise takes part of the privacy budget (the noise split of the paper)."""

    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="γ, the share of updates meant to lie within C."
    )
    learning_rate: float = Field(0.2, gt=0, description="η, the step of the geometric update of C.")
    count_stddev: float | None = Field(
        None,
        gt=0,
        description="σ_b, the standard deviation of the noise on the count of updates within C; null: the "
        "expected clients per round / 20 (the paper's choice). Must exceed noise_multiplier / 2.",
    )


class PrivacyConfig(StrictModel):
    """Client-level differential privacy of the prompt updates (DP-FedAvg, McMahan et al. 2018).

    central: the server (trusted) clips each client's delta to ``clip_norm``, averages the clipped
    deltas with uniform weights over the expected number of clients K, and adds N(0, (σC/K)²) to
    each coordinate; an RDP accountant (dp-accounting) reports ε at ``delta`` every round.
    local: each client clips its own delta and adds N(0, σ²C²) before upload (no trusted server);
    on Flower each site keeps a ledger of what it has spent and refuses uploads over its budget.
    """

    kind: Literal["none", "central", "local"] = "none"
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="C, the L2 bound on each client's delta (the initial C with adaptive clipping).",
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ, the noise standard deviation in units of C (null: from target_epsilon)."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="The ε at `delta` the whole run (federation.rounds) may spend: σ is computed from it, "
        "or a given noise_multiplier too small for it is refused at start.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")
    sampling: Literal["poisson", "fixed"] = Field(
        "poisson",
        description="central: poisson samples each client independently with probability federation.fraction "
        "(what DP-FedAvg's accountant assumes; a round may have any number of clients); fixed samples "
        "federation.min_clients/fraction clients without replacement, accounted for replace-one neighbours.",
    )
    adaptive_clipping: AdaptiveClippingConfig | None = Field(
        None, description="central only: let C track a quantile of the update norms."
    )
    server_lr: float = Field(1.0, gt=0, description="central only: η of the server step θ ← θ + η·v.")
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="central only: β of the server momentum v ← β·v + (noised mean delta)."
    )
    noise_seed: Literal["system", "reproducible-insecure"] = Field(
        "system",
        description="Where the noise (and, under central DP, the client sample) comes from. system: the "
        "operating system's CSPRNG, which no one can reproduce. reproducible-insecure: the run seed (or, "
        "local DP, the round seed the server sends), so runs and resumes are bit-identical, but anyone "
        "who holds the configuration can subtract the noise: not private against them; simulations "
        "only (refused on Flower), and written in the run's summary. Old values: run means "
        "reproducible-insecure, secret means system.",
    )

    site_epsilon_budget: float | None = Field(
        None,
        gt=0,
        description="local only: the ε at delta a site may spend on its partition over every run its "
        "ledger (in its state folder) records; an upload beyond it is refused by the site, whatever the "
        "server asks. null: target_epsilon. On Flower one of the two is required.",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_noise_seed(cls, data: Any) -> Any:
        """Configurations written before the noise came from the operating system by default said
        ``noise_seed: run`` (the run seed) or ``secret``: read them as what they meant, and drop the
        field from a run without privacy (whose dumped configuration always carried it)."""
        if not isinstance(data, dict) or data.get("noise_seed") not in LEGACY_NOISE_SEEDS:
            return data
        data = dict(data)
        legacy = data.pop("noise_seed")
        if data.get("kind", "none") != "none":
            data["noise_seed"] = LEGACY_NOISE_SEEDS[legacy]
        return data

    @model_validator(mode="after")
    def _complete(self) -> PrivacyConfig:
        given = [  # fields off their defaults (a dumped config sets every field)
            name
            for name, field in type(self).model_fields.items()
            if name != "kind" and getattr(self, name) != field.get_default(call_default_factory=True)
        ]
        if self.kind == "none":
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to a differentially private run; set kind: central or "
                    "local, or remove them"
                )
            return self
        if self.clip_norm is None:
            raise ValueError(
                f"kind {self.kind} needs clip_norm, the L2 bound C on each client's delta (about a typical "
                "update norm; see update_norm in clients.jsonl of a non-private run)"
            )
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                f"kind {self.kind} needs noise_multiplier (σ, in units of clip_norm) or target_epsilon "
                "(the ε at delta the run may spend; σ is then computed)"
            )
        if self.kind == "central" and "site_epsilon_budget" in given:
            raise ValueError(
                "site_epsilon_budget applies to kind local (each site's own ledger); central DP's budget "
                "is target_epsilon"
            )
        if self.kind == "local":
            central = ("adaptive_clipping", "server_lr", "server_momentum", "sampling")
            central_only = [name for name in central if name in given]
            if central_only:
                raise ValueError(
                    f"{', '.join(central_only)} apply to kind central; local DP noises each upload on its "
                    "client, so sampling gives no amplification against the server and any strategy is "
                    "post-processing (e.g. strategy.kind fedadam for a server optimiser); remove them"
                )
        return self
