"""FedKSeed (Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes"): zeroth-order training along a shared pool of K seeds, where
clients send (seed index, projected gradient) pairs instead of the prompt.

Each client takes S SPSA steps from the global prompt θ_r, each along the direction u of a seed
drawn from the pool (``optimizers.seed_pool``), and sends only its S pairs (k_j, ĝ_j): 8·S bytes
of tensors, whatever the prompt's size. The server replays every accepted client's pairs from θ_r,
clients in client-id order and each client's pairs in step order:

    θ ← θ − η·(w_c·ĝ_j)·u_{k_j},   w_c = n_c/Σn (weighting ``examples``) or 1/C (``equal``),

in float64, rounded to float32 once at the end. With one client w_c = 1 and the replay is the
client's own local trajectory, bit for bit. This is FedAvg of the clients' local prompts, computed
from the pairs (the reference's ``aggregate_seed_pool``).

Downlink ``prompt`` sends the global prompt as usual. Downlink ``seed-pool`` is the paper's: the
server keeps a_k, the weighted sum of every ĝ ever accepted for seed k, and sends the K values
(4·K bytes); every party rebuilds the prompt from the initial one θ_0 as θ_0 − Σ_k η·a_k·u_k in
seed order (the reference's ``update_global_model_by_seed_pool``), so a client that missed rounds
needs nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedprompt.config import FedKSeedConfig, RunConfig, SPSAOptimizerConfig
from fedprompt.federation.client_rules import ClientRule, RoundInputs, RoundOutput
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.seeding import derive_seed
from optimizers.base import OptimizationStats
from optimizers.seed_pool import SeedPool, importance_probabilities, replay_pairs_

SEED_INDEX = "seed_index"
"""Uplink extra [S]: the pool index of each local step's seed (float32, integer-valued)."""
PROJECTED_GRAD = "projected_grad"
"""Uplink extra [S]: each local step's projected gradient ĝ (float32; 0 for a skipped step)."""
SEED_POOL = "seed_pool"
"""Downlink extra [K] of ``downlink: seed-pool``: a_k, the accumulated weighted ĝ of each seed."""
SEED_PROBABILITIES = "seed_probabilities"
"""Downlink extra [K] of ``seed_sampling: importance`` (FedKSeed-Pro): each seed's probability."""
FINGERPRINT = "kseed_fingerprint"
"""Client-config value: the server's fingerprint of the pool's first directions over the prompt."""
ORIGIN = "origin/"
"""Prefix of θ_0 in the strategy's checkpointed state (``downlink: seed-pool``)."""
AMPLITUDE_SUM = "amplitude_sum"
AMPLITUDE_COUNT = "amplitude_count"
"""FedKSeed-Pro's checkpointed history of each seed: Σ|ĝ| and the count of values (from one 0)."""


@dataclass(frozen=True)
class KSeedSetup:
    """What every party of a FedKSeed run derives from its configuration: the pool (its seed from
    the run seed), the steps S per round, η, ε, the bound on |ĝ|, the weighting and the downlink."""

    pool_seed: int
    num_seeds: int
    steps: int
    lr: float
    epsilon: float
    max_projected_grad: float
    weighting: Literal["examples", "equal"] = "examples"
    downlink: Literal["prompt", "seed-pool"] = "prompt"
    seed_sampling: Literal["uniform", "importance"] = "uniform"

    def __post_init__(self) -> None:
        if self.num_seeds < 1 or self.steps < 1:
            raise ValueError(f"FedKSeed needs seeds and steps, got K={self.num_seeds}, S={self.steps}")
        for name in ("lr", "epsilon", "max_projected_grad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"FedKSeed {name} must be a positive number, got {value}")

    @property
    def pool(self) -> SeedPool:
        return SeedPool(self.pool_seed, self.num_seeds)

    def fingerprint(self, state: State) -> int:
        """The pool's fingerprint over the prompt's tensors in name order (what steps perturb)."""
        return self.pool.fingerprint([state[name] for name in sorted(state)])


def kseed_setup(config: RunConfig) -> KSeedSetup | None:
    """The FedKSeed setup of a validated configuration, or None for other strategies."""
    strategy, opt = config.strategy, config.optimizer
    if not isinstance(strategy, FedKSeedConfig):
        return None
    if not isinstance(opt, SPSAOptimizerConfig):  # the config refuses this; keep the types honest
        raise ValueError("strategy.kind fedkseed needs optimizer.kind spsa")
    return KSeedSetup(
        pool_seed=derive_seed(config.seed, "fedkseed-pool"),
        num_seeds=strategy.num_seeds,
        steps=opt.budget // (2 * opt.batch_size),
        lr=opt.lr,
        epsilon=opt.epsilon,
        max_projected_grad=strategy.max_projected_grad,
        weighting=strategy.weighting,
        downlink=strategy.downlink,
        seed_sampling=strategy.seed_sampling,
    )


def check_pairs(extras: State, setup: KSeedSetup) -> tuple[list[int], list[float]]:
    """(seed indices, projected gradients) of an update's extras; ValueError naming the first bad
    pair: an index that is not an integer in [0, K), a ĝ that is not finite or exceeds the bound."""
    indices, grads = extras[SEED_INDEX].reshape(-1).tolist(), extras[PROJECTED_GRAD].reshape(-1).tolist()
    if len(indices) != len(grads):
        raise ValueError(f"{len(indices)} seed indices but {len(grads)} projected gradients")
    for step, (index, grad) in enumerate(zip(indices, grads, strict=True)):
        if not (math.isfinite(index) and index == int(index) and 0 <= index < setup.num_seeds):
            raise ValueError(f"step {step}: seed index {index} is not an integer in [0, {setup.num_seeds})")
        if not math.isfinite(grad):
            raise ValueError(f"step {step}: projected gradient {grad} is not finite")
        if abs(grad) > setup.max_projected_grad:
            raise ValueError(
                f"step {step}: |projected gradient| {abs(grad):.6g} exceeds max_projected_grad "
                f"{setup.max_projected_grad:g}"
            )
    return [int(i) for i in indices], grads


def _float64(state: State) -> list[torch.Tensor]:
    """The state's tensors in name order, as float64 CPU copies (what replays run on)."""
    return [state[name].detach().to("cpu", torch.float64).clone() for name in sorted(state)]


def _float32(tensors: Sequence[torch.Tensor], like: State) -> State:
    return {name: t.to(torch.float32) for name, t in zip(sorted(like), tensors, strict=True)}


def replay_round(
    start: State, pairs: Sequence[tuple[list[int], list[float], float]], setup: KSeedSetup
) -> State:
    """θ_r replayed with each (indices, grads, weight) in the given order (float64, then float32)."""
    tensors = _float64(start)
    for indices, grads, weight in pairs:
        replay_pairs_(tensors, setup.pool, indices, grads, setup.lr, weight)
    return _float32(tensors, start)


def rebuild_from_pool(origin: State, accumulated: torch.Tensor, setup: KSeedSetup) -> State:
    """θ_0 − Σ_k η·a_k·u_k in seed order over the seeds with a_k ≠ 0 (``downlink: seed-pool``);
    ``accumulated`` is the float32 a the downlink carries."""
    values = accumulated.detach().to("cpu", torch.float32).reshape(-1)
    if values.numel() != setup.num_seeds:
        raise ValueError(f"the seed pool sent holds {values.numel()} values, expected {setup.num_seeds}")
    used = torch.nonzero(values).reshape(-1).tolist()
    return replay_round(origin, [(used, [float(values[k]) for k in used], 1.0)], setup)


class FedKSeed(Strategy):
    """The server side: validates each client's pairs and replays them onto the global prompt.
    Owns, with ``downlink: seed-pool``, θ_0 (recorded at the first aggregation) and the accumulated
    a_k of every seed (float64; sent and replayed as float32); with ``seed_sampling: importance``,
    each seed's history of |ĝ| (its sum and count, from one 0 as FedKSeed-Pro starts it); all
    checkpointed. Tells clients the fingerprint of the pool's first directions over the prompt."""

    def __init__(self, setup: KSeedSetup) -> None:
        self.setup = setup
        self._origin: State | None = None
        self._accumulated = torch.zeros(setup.num_seeds, dtype=torch.float64)
        self._amplitude_sum = torch.zeros(setup.num_seeds, dtype=torch.float64)
        self._amplitude_count = torch.ones(setup.num_seeds, dtype=torch.float64)
        self._fingerprint: float | None = None

    def initialize(self, global_state: State) -> None:
        self._fingerprint = float(self.setup.fingerprint(global_state))

    def client_config(self) -> dict[str, float]:
        """The fingerprint of the directions every party must step along."""
        return {} if self._fingerprint is None else {FINGERPRINT: self._fingerprint}

    def probabilities(self) -> torch.Tensor:
        """FedKSeed-Pro's seed probabilities from the history so far (uniform before any)."""
        return importance_probabilities(self._amplitude_sum, self._amplitude_count)

    def uplink_shapes(self, global_state: State) -> dict[str, tuple[int, ...]]:
        """No prompt tensor travels up: only the pairs (``uplink_extras``)."""
        return {}

    def uplink_extras(self) -> dict[str, tuple[int, ...]]:
        return {SEED_INDEX: (self.setup.steps,), PROJECTED_GRAD: (self.setup.steps,)}

    def validate_update(self, update: Update) -> None:
        check_pairs(update.extras, self.setup)

    def downlink_shapes(self, global_state: State) -> dict[str, tuple[int, ...]]:
        if self.setup.downlink == "seed-pool":
            return {}
        return super().downlink_shapes(global_state)

    def downlink_state(self, client_id: int, global_state: State) -> State:
        return {} if self.setup.downlink == "seed-pool" else global_state

    def downlink_extras(self) -> State:
        extras: State = {}
        if self.setup.downlink == "seed-pool":
            extras[SEED_POOL] = self._accumulated.to(torch.float32)
        if self.setup.seed_sampling == "importance":
            extras[SEED_PROBABILITIES] = self.probabilities().to(torch.float32)
        return extras

    def _weights(self, updates: Sequence[Update]) -> list[float]:
        if self.setup.weighting == "equal":
            return [1.0 / len(updates)] * len(updates)
        total = sum(u.num_examples for u in updates)
        return [u.num_examples / total for u in updates]

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        pairs = [
            (*check_pairs(u.extras, self.setup), w)
            for u, w in zip(updates, self._weights(updates), strict=True)
        ]
        for indices, grads, _ in pairs:
            for index, grad in zip(indices, grads, strict=True):
                self._amplitude_sum[index] += abs(grad)
                self._amplitude_count[index] += 1
        if self.setup.downlink == "prompt":
            return replay_round(global_state, pairs, self.setup)
        if self._origin is None:
            self._origin = {
                name: t.detach().to("cpu", torch.float32).clone() for name, t in global_state.items()
            }
        for indices, grads, weight in pairs:
            for index, grad in zip(indices, grads, strict=True):
                self._accumulated[index] += weight * grad
        return rebuild_from_pool(self._origin, self._accumulated.to(torch.float32), self.setup)

    def report(self) -> dict[str, Any]:
        """How many seeds of the pool the global prompt has moved along (``downlink: seed-pool``)."""
        if self.setup.downlink == "seed-pool":
            return {"kseed_seeds_used": int(torch.count_nonzero(self._accumulated.to(torch.float32)))}
        return {}

    def state_dict(self) -> State:
        state: State = {}
        if self._origin is not None:
            state = {SEED_POOL: self._accumulated.clone(), **{ORIGIN + n: t for n, t in self._origin.items()}}
        if self.setup.seed_sampling == "importance":
            state[AMPLITUDE_SUM] = self._amplitude_sum.clone()
            state[AMPLITUDE_COUNT] = self._amplitude_count.clone()
        return state

    def load_state_dict(self, state: State) -> None:
        size = self.setup.num_seeds
        self._origin, self._accumulated = None, torch.zeros(size, dtype=torch.float64)
        self._amplitude_sum = torch.zeros(size, dtype=torch.float64)
        self._amplitude_count = torch.ones(size, dtype=torch.float64)
        expected = set()
        if self.setup.downlink == "seed-pool" and SEED_POOL in state:
            expected |= {SEED_POOL} | {k for k in state if k.startswith(ORIGIN)}
            self._accumulated = _pool_vector(state, SEED_POOL, size)
            self._origin = {
                k.removeprefix(ORIGIN): v.clone() for k, v in state.items() if k.startswith(ORIGIN)
            }
        if self.setup.seed_sampling == "importance" and AMPLITUDE_SUM in state:
            expected |= {AMPLITUDE_SUM, AMPLITUDE_COUNT}
            self._amplitude_sum = _pool_vector(state, AMPLITUDE_SUM, size)
            self._amplitude_count = _pool_vector(state, AMPLITUDE_COUNT, size)
        unknown = sorted(set(state) - expected)
        if unknown:
            raise ValueError(
                f"FedKSeed with downlink {self.setup.downlink!r} and seed_sampling "
                f"{self.setup.seed_sampling!r} keeps no state like {unknown}"
            )


def _pool_vector(state: State, name: str, size: int) -> torch.Tensor:
    """A checkpointed per-seed vector [K] in float64, or ValueError when its length is not K."""
    if name not in state:
        raise ValueError(f"the checkpointed FedKSeed state lacks {name!r}")
    vector = state[name].to(torch.float64).reshape(-1)
    if vector.numel() != size:
        raise ValueError(f"checkpointed {name} has {vector.numel()} values, expected {size}")
    return vector.clone()


class KSeedRule(ClientRule):
    """The client side: starts from the global prompt (``downlink: prompt``) or rebuilds it from the
    accumulated seed pool the server sent and the initial prompt θ_0 (``downlink: seed-pool``), and
    sends no prompt: the trainer's pairs travel as the update's extras."""

    def __init__(self, setup: KSeedSetup, initial_state: State | None = None) -> None:
        if setup.downlink == "seed-pool" and initial_state is None:
            raise ValueError("FedKSeed's seed-pool downlink needs the initial prompt θ_0 on every client")
        self.setup = setup
        self.initial_state = initial_state
        self._fingerprints: dict[tuple, int] = {}

    def start(self, inputs: RoundInputs) -> State:
        if self.setup.downlink == "prompt":
            state = inputs.downlink
        elif SEED_POOL not in inputs.instructions.extras:
            raise ValueError(f"FedKSeed's seed-pool inputs.downlink sent no {SEED_POOL!r}")
        else:
            state = rebuild_from_pool(self.initial_state, inputs.instructions.extras[SEED_POOL], self.setup)
        self._check_fingerprint(inputs.instructions.client_config, state)
        return state

    def _check_fingerprint(self, client_config: Mapping[str, float], state: State) -> None:
        """Refuse to step along directions other than the server's (another NumPy stream, pool seed or
        prompt layout would make every replay of this client's pairs wrong)."""
        sent = client_config.get(FINGERPRINT)
        if sent is None:
            raise ValueError(f"the FedKSeed server sent no {FINGERPRINT!r} to check the seed pool against")
        key = tuple((name, tuple(state[name].shape)) for name in sorted(state))
        if key not in self._fingerprints:
            self._fingerprints[key] = self.setup.fingerprint(state)
        if float(self._fingerprints[key]) != float(sent):
            raise ValueError(
                f"this party's seed-pool directions differ from the server's (fingerprint "
                f"{self._fingerprints[key]:x}, the server's {int(sent):x}): the same pool seed and prompt "
                "give other directions here, so every step would be replayed wrong; run the same fedprompt "
                "and NumPy release on every party"
            )

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        if SEED_INDEX not in stats.tensors or PROJECTED_GRAD not in stats.tensors:
            raise ValueError("FedKSeed clients send the pairs of their steps; the trainer reported none")
        return RoundOutput({}, {}, {})
