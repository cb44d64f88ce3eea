"""The server side of federated rounds, independent of how bytes travel."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedprompt.errors import PayloadError
from fedprompt.federation.client_state import NEVER
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import ByteCounter, PayloadSpec, decode_update, encode_state
from fedprompt.federation.sampling import poisson_sample_clients, sample_clients
from fedprompt.federation.state import State, Update, clone_state, pack
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.update_pipeline import ExampleBounds, check_metrics, clip_delta
from fedprompt.seeding import derive_seed

log = logging.getLogger("fedprompt.server")

ROUND_KEY = "fedprompt.round"
ACCEPTED_ROUNDS_KEY = "fedprompt.accepted_rounds"
STAGE_PREFIX = "stage/"


class AggregationFailed(RuntimeError):
    """The strategy (or a stage after it) could not turn a round's accepted updates into a new
    finite global state; the round is skipped and the global prompt stays as it was."""


class CandidateRejected(AggregationFailed):
    """A stage's acceptance test refused the round's new global state (e.g. it scores worse on the
    server's held-out set): the round is skipped like a failed aggregation, logged as a decision."""


@dataclass
class RoundRecord:
    """What happened to each sampled client in one round, and to the round's aggregation."""

    round: int
    sampled: list[int]
    accepted: list[Update] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    clamped: dict[int, int] = field(default_factory=dict)
    """Client id -> the example count it claimed, for updates whose count was clamped."""
    norms: dict[int, float] = field(default_factory=dict)
    """Client id -> the norm of its delta from the global prompt, before any clipping."""
    aggregation_error: str | None = None
    """Why the round's aggregation failed (the global prompt then stays as it was)."""
    stage_metrics: dict[str, Any] = field(default_factory=dict)
    """What the aggregation stages report for the round (e.g. the privacy spent so far)."""

    @property
    def used(self) -> list[int]:
        """The clients whose updates went into the new global prompt."""
        return [] if self.aggregation_error is not None else [u.client_id for u in self.accepted]


class AggregationStage(Protocol):
    """A step after the strategy, shared by every strategy: e.g. server-side DP noise and the
    privacy accountant. It may change the aggregated state; it owns state it checkpoints."""

    name: str
    runs_without_updates: bool
    """Whether the stage also runs in a round without any accepted update (``aggregated`` is then the
    previous global state), e.g. DP noise, which a round must release whatever clients it had. A
    stage without this attribute does not; the round is then skipped."""

    def begin_round(self, server: Server, record: RoundRecord) -> None:
        """Before the round's updates arrive (e.g. set this round's clipping bound)."""

    def apply(self, server: Server, record: RoundRecord, previous: State, aggregated: State) -> State:
        """The new global state from the strategy's output; may report into ``record.stage_metrics``."""

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...


class Server:
    """Owns the global prompt state and the server side of each round.

    Seeded client sampling, the downlink payload (the strategy may send each client its own) and
    the per-client fit instructions, the update pipeline every uplink goes through (validation,
    metric and weight bounds, norm clipping; see ``fedprompt.federation.update_pipeline``), aggregation by the
    strategy in client-id order and the stages after it, which round of each client's updates was
    last used, byte counts, and the tensors a checkpoint needs. A strategy that fails on a round's
    updates skips that round with a logged reason, and never leaves its state half-changed.
    Runtimes (in-process, Flower) only carry the bytes.
    """

    def __init__(
        self,
        initial_state: State,
        strategy: Strategy,
        client_ids: Sequence[int],
        *,
        fraction: float,
        min_clients: int,
        seed: int,
        wire_dtype: str,
        max_bytes: int,
        example_bounds: ExampleBounds | None = None,
        max_update_norm: float | None = None,
        stages: Sequence[AggregationStage] = (),
        poisson_sampling: bool = False,
        system_sampling: bool = False,
    ) -> None:
        self.global_state = clone_state(initial_state)
        self.strategy = strategy
        strategy.initialize(self.global_state)
        self.client_ids = sorted(client_ids)
        self.fraction = fraction
        self.min_clients = min_clients
        self.seed = seed
        self.wire_dtype = wire_dtype
        self.max_bytes = max_bytes
        self.example_bounds = example_bounds or ExampleBounds()
        self.max_update_norm = max_update_norm
        """The norm bound on each delta (robustness and DP share it); a stage may change it per round."""
        self.stages = list(stages)
        self.poisson_sampling = poisson_sampling
        """Sample each client with probability ``fraction`` (differential privacy's assumption) instead
        of a fixed number of clients; a round may then have none."""
        self.system_sampling = system_sampling
        """Draw the sample from the operating system's CSPRNG, not the run seed (central DP)."""
        self.bytes = ByteCounter()
        self.completed_rounds = 0
        self.accepted_rounds: dict[int, int] = {}
        """Client id -> the last round whose update of that client went into the global prompt."""

    @property
    def uplink_spec(self) -> PayloadSpec:
        """What every client update must hold: the strategy's uplink tensors and its extras."""
        shapes = self.strategy.uplink_shapes(self.global_state)
        return PayloadSpec(
            {**shapes, **{f"extra/{n}": s for n, s in self.strategy.uplink_extras().items()}},
            self.wire_dtype,
            self.max_bytes,
        )

    @property
    def downlink_spec(self) -> PayloadSpec:
        """What a client checks the downlink against: the strategy's downlink tensors (the prompt
        state by default) and its extras."""
        shapes = self.strategy.downlink_shapes(self.global_state)
        extras = {f"extra/{name}": tuple(t.shape) for name, t in self.strategy.downlink_extras().items()}
        return PayloadSpec({**shapes, **extras}, self.wire_dtype, self.max_bytes)

    def sample(self, round_num: int) -> list[int]:
        system = self.system_sampling
        if self.poisson_sampling:
            return poisson_sample_clients(self.client_ids, self.fraction, self.seed, round_num, system=system)
        return sample_clients(
            self.client_ids, self.fraction, self.min_clients, self.seed, round_num, system=system
        )

    def accepted_round(self, client_id: int) -> int:
        """The last round whose update of ``client_id`` the server used (0: none)."""
        return self.accepted_rounds.get(client_id, NEVER)

    def instructions(self, round_num: int, client_id: int) -> FitInstructions:
        return FitInstructions(
            round=round_num,
            seed=derive_seed(self.seed, "client-train", client_id, round_num),
            client_config=self.strategy.client_config(),
            accepted_round=self.accepted_round(client_id),
        )

    def begin_round(self, round_num: int) -> RoundRecord:
        """The record of a new round, with its sampled clients; stages prepare for it."""
        record = RoundRecord(round_num, self.sample(round_num))
        for stage in self.stages:
            stage.begin_round(self, record)
        return record

    def downlink(self, round_num: int, client_id: int) -> bytes:
        """The state the strategy sends this client (the global state, or a personalised one) and
        its extras, as bytes (counted as bytes down)."""
        state = self.strategy.downlink_state(client_id, self.global_state)
        tensors = pack(state, self.strategy.downlink_extras())
        payload = encode_state(tensors, self.wire_dtype, {ROUND_KEY: str(round_num)})
        self.bytes.record(round_num, client_id, "down", len(payload))
        return payload

    def receive(self, record: RoundRecord, client_id: int, payload: bytes) -> Update | None:
        """Run one client's uplink bytes through the update pipeline; keep the update or log why
        it was rejected."""
        self.bytes.record(record.round, client_id, "up", len(payload))
        try:
            update = decode_update(payload, self.uplink_spec, expected_client_id=client_id)
        except PayloadError as exc:
            self.reject(record, client_id, f"invalid payload: {exc}")
            return None
        try:
            check_metrics(update.metrics)
            self.strategy.validate_update(update)
        except ValueError as exc:
            self.reject(record, client_id, f"invalid update: {exc}")
            return None
        update, claimed = self.example_bounds.apply(update)
        if claimed is not None:
            record.clamped[client_id] = claimed
            log.warning(
                "round %d: client %d claimed %d examples; counted as %d",
                record.round,
                client_id,
                claimed,
                update.num_examples,
            )
        if self.max_update_norm is not None and update.state:
            state, norm = clip_delta(update.state, self.global_state, self.max_update_norm)
            record.norms[client_id] = norm
            update = Update(update.client_id, state, update.num_examples, update.metrics, update.extras)
        record.accepted.append(update)
        return update

    def reject(self, record: RoundRecord, client_id: int, reason: str) -> None:
        record.rejected[client_id] = reason
        log.warning("round %d: update of client %d rejected: %s", record.round, client_id, reason)

    def aggregate(self, record: RoundRecord) -> State:
        """Apply the strategy and the stages to the accepted updates.

        With no accepted update (unless a stage runs without updates: the stages then see the
        previous global state as the aggregate), or when the strategy or a stage fails (an error, a
        non-finite result), the round is skipped: the global state and every piece of server state
        stay as they were, and the reason goes into ``record.aggregation_error``.
        """
        record.accepted, relative = self.example_bounds.bound_round(record.accepted)
        for cid, count in relative.items():
            record.clamped.setdefault(cid, count)
            log.warning(
                "round %d: client %d's weight %d is over %g x the round's median count; counted as %d",
                record.round,
                cid,
                count,
                self.example_bounds.max_ratio,
                next(u.num_examples for u in record.accepted if u.client_id == cid),
            )
        if not record.accepted and not any(getattr(s, "runs_without_updates", False) for s in self.stages):
            log.warning("round %d: no valid update arrived; the global prompt stays as it was", record.round)
            record.aggregation_error = "no valid update arrived"
        else:
            saved = self._server_state()
            try:
                new_state = self._aggregate(record)
            except CandidateRejected as exc:
                self._restore_server_state(saved)
                record.aggregation_error = f"{type(exc).__name__}: {exc}"
                log.warning("round %d: %s; the global prompt stays as it was", record.round, exc)
            except (ValueError, ArithmeticError, RuntimeError) as exc:
                self._restore_server_state(saved)
                record.aggregation_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "round %d: aggregation failed, the global prompt stays as it was: %s",
                    record.round,
                    record.aggregation_error,
                )
            else:
                self.global_state = new_state
                for cid in record.used:
                    self.accepted_rounds[cid] = record.round
        self.completed_rounds = record.round
        return self.global_state

    def _aggregate(self, record: RoundRecord) -> State:
        if record.accepted:
            new_state = self.strategy.aggregate(self.global_state, record.accepted)
            record.stage_metrics.update(self.strategy.report())
        else:
            new_state = clone_state(self.global_state)
        for stage in self.stages:
            new_state = stage.apply(self, record, self.global_state, new_state)
        _check_finite("aggregated global state", new_state)
        if set(new_state) != set(self.global_state) or any(
            new_state[n].shape != self.global_state[n].shape for n in new_state
        ):
            raise AggregationFailed(
                f"the strategy returned tensors {sorted(new_state)} of other names or shapes than the "
                "global state"
            )
        _check_finite(f"{type(self.strategy).__name__} state", self.strategy.state_dict())
        return clone_state(new_state)

    def _server_state(self) -> dict[str, State]:
        return {
            "strategy": {k: v.clone() for k, v in self.strategy.state_dict().items()},
            **{stage.name: {k: v.clone() for k, v in stage.state_dict().items()} for stage in self.stages},
        }

    def _restore_server_state(self, saved: dict[str, State]) -> None:
        self.strategy.load_state_dict(saved["strategy"])
        for stage in self.stages:
            stage.load_state_dict(saved[stage.name])

    def skip_round(self, round_num: int, reason: str) -> RoundRecord:
        """Count round ``round_num`` as run without aggregating anything (the global state and the
        server state stay as they are), e.g. a secure round that cannot be run again; its record."""
        record = RoundRecord(round_num, [], aggregation_error=reason)
        log.warning("round %d skipped: %s", round_num, reason)
        self.completed_rounds = round_num
        return record

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> tuple[State, dict[str, str]]:
        """Tensors and metadata that restore this server exactly: the global state, the strategy's
        and the stages' state, and the round each client's update was last used."""
        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        tensors.update({f"strategy/{k}": v for k, v in self.strategy.state_dict().items()})
        for stage in self.stages:
            tensors.update({f"{STAGE_PREFIX}{stage.name}/{k}": v for k, v in stage.state_dict().items()})
        rounds = {str(cid): r for cid, r in sorted(self.accepted_rounds.items())}
        return tensors, {ROUND_KEY: str(self.completed_rounds), ACCEPTED_ROUNDS_KEY: json.dumps(rounds)}

    def restore(self, tensors: State, metadata: dict[str, str]) -> None:
        glob = {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
        if set(glob) != set(self.global_state):
            raise ValueError(
                f"checkpoint holds {sorted(glob)}, this run's prompt has {sorted(self.global_state)}"
            )
        for name, t in glob.items():
            if t.shape != self.global_state[name].shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(t.shape)}, expected "
                    f"{tuple(self.global_state[name].shape)}"
                )
        self.global_state = clone_state(glob)
        self.strategy.load_state_dict(
            {k.removeprefix("strategy/"): v for k, v in tensors.items() if k.startswith("strategy/")}
        )
        for stage in self.stages:
            prefix = f"{STAGE_PREFIX}{stage.name}/"
            stage.load_state_dict(
                {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            )
        self.completed_rounds = int(metadata[ROUND_KEY])
        rounds = json.loads(metadata.get(ACCEPTED_ROUNDS_KEY, "{}"))
        self.accepted_rounds = {int(cid): int(r) for cid, r in rounds.items()}


def _check_finite(what: str, state: State) -> None:
    bad = sorted(
        name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )
    if bad:
        raise AggregationFailed(f"{what} has non-finite values in {bad}")
