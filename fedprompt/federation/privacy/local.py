"""Local differential privacy: each client clips and noises its own delta before upload, so the
server needs no trust; the server's stage only accounts what each client has released."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedprompt.federation.client_rules import ClientRule, Penalty, RoundInputs, RoundOutput
from fedprompt.federation.privacy.accounting import PrivacyPlan
from fedprompt.federation.privacy.central import check_clipped
from fedprompt.federation.privacy.noise import REPRODUCIBLE, NoiseMode, SeededNoise, SystemNoise
from fedprompt.federation.state import State
from fedprompt.federation.update_pipeline import clip_delta, delta_norm
from optimizers.base import OptimizationStats

if TYPE_CHECKING:
    from fedprompt.federation.server import RoundRecord, Server


class LocalPrivacyRule(ClientRule):
    """Wraps the strategy's client rule (``inner``) on the client: the round starts, trains and
    carries state as ``inner`` says; what it would send, θ + Δ, goes up as θ + clip_C(Δ) + N(0, σ²C²)
    per coordinate (θ the downlink). Owns C, σ and where the noise comes from: the client's own
    operating system (``noise_seed: system``, the default: nothing the server sends enters it), or,
    in a simulation only, the round seed the server sent (``reproducible-insecure``: the server can
    subtract it)."""

    def __init__(
        self, inner: ClientRule, clip_norm: float, noise_multiplier: float, noise_mode: NoiseMode = "system"
    ):
        self.inner = inner
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.noise_mode = noise_mode
        self.uses_validation = inner.uses_validation

    def start(self, inputs: RoundInputs) -> State:
        return self.inner.start(inputs)

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        return self.inner.penalty(inputs)

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        output = self.inner.finish(inputs, trained, stats)
        clipped, _ = clip_delta(output.state, inputs.downlink, self.clip_norm)
        check_clipped("this client's delta", delta_norm(clipped, inputs.downlink), self.clip_norm)
        source = SeededNoise(inputs.instructions.seed) if self.noise_mode == REPRODUCIBLE else SystemNoise()
        noise = source.normal({name: tuple(t.shape) for name, t in clipped.items()}, "local-dp-noise")
        std = self.noise_multiplier * self.clip_norm
        noised = {
            name: clipped[name].detach().to("cpu", torch.float64) + std * noise[name]
            for name in sorted(clipped)
        }
        return RoundOutput(noised, output.extras, output.carried)


class LocalPrivacyAccountant:
    """The server's view of local DP: counts each client's uploads (every sampled client may upload)
    and reports ε at δ of the client that uploaded most. Owns the upload counts (checkpointed);
    leaves the aggregate as the strategy made it."""

    name = "privacy"
    runs_without_updates = False

    def __init__(self, plan: PrivacyPlan) -> None:
        if plan.kind != "local":
            raise ValueError(f"LocalPrivacyAccountant needs a local privacy plan, got {plan.kind!r}")
        self.plan = plan
        self.uploads = torch.zeros(plan.population, dtype=torch.int64)

    def begin_round(self, server: Server, record: RoundRecord) -> None:
        for cid in record.sampled:
            if not 0 <= cid < self.plan.population:
                raise ValueError(
                    f"client {cid} is outside the {self.plan.population} clients the plan accounts"
                )
            self.uploads[cid] += 1
        plan = self.plan
        record.stage_metrics.update(
            {
                "epsilon": plan.epsilon(int(self.uploads.max())),
                "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier,
                "clip_norm": plan.clip_norm,
                "sampling_rate": plan.sampling_rate,
            }
        )

    def apply(self, server: Server, record: RoundRecord, previous: State, aggregated: State) -> State:
        return aggregated

    def state_dict(self) -> State:
        return {"uploads": self.uploads.clone()}

    def load_state_dict(self, state: State) -> None:
        if state:
            if state["uploads"].shape != self.uploads.shape:
                raise ValueError(
                    f"checkpointed upload counts cover {state['uploads'].numel()} clients, this run "
                    f"{self.uploads.numel()}"
                )
            self.uploads = state["uploads"].clone()
