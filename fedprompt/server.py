"""The server side of federated rounds, independent of how bytes travel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedprompt.payload import ByteCounter, PayloadError, PayloadSpec, decode_update, encode_state
from fedprompt.sampling import sample_clients
from fedprompt.seeding import derive_seed
from fedprompt.state import State, Update, clone_state, pack
from fedprompt.strategies.base import Strategy
from fedprompt.training import FitInstructions

log = logging.getLogger("fedprompt.server")

ROUND_KEY = "fedprompt.round"


@dataclass
class RoundRecord:
    """What happened to each sampled client in one round."""

    round: int
    sampled: list[int]
    accepted: list[Update] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


class Server:
    """Owns the global prompt state and the server side of each round.

    Seeded client sampling, the downlink payload and the per-client fit instructions, the
    validation of every uplink payload (a bad one is rejected with a logged reason and the round
    goes on without it), aggregation by the strategy in client-id order, byte counts, and the
    tensors a checkpoint needs. Runtimes (in-process, Flower) only carry the bytes.
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
    ) -> None:
        self.global_state = clone_state(initial_state)
        self.strategy = strategy
        self.client_ids = sorted(client_ids)
        self.fraction = fraction
        self.min_clients = min_clients
        self.seed = seed
        self.wire_dtype = wire_dtype
        self.max_bytes = max_bytes
        self.bytes = ByteCounter()
        self.completed_rounds = 0

    @property
    def uplink_spec(self) -> PayloadSpec:
        """What every client update must hold: the prompt state's tensors and the strategy's extras."""
        return PayloadSpec.for_state(
            self.global_state, self.wire_dtype, self.max_bytes, self.strategy.uplink_extras()
        )

    @property
    def downlink_spec(self) -> PayloadSpec:
        """What a client checks the downlink against: the prompt state and the strategy's extras."""
        extras = {name: tuple(t.shape) for name, t in self.strategy.downlink_extras().items()}
        return PayloadSpec.for_state(self.global_state, self.wire_dtype, self.max_bytes, extras)

    def sample(self, round_num: int) -> list[int]:
        return sample_clients(self.client_ids, self.fraction, self.min_clients, self.seed, round_num)

    def instructions(self, round_num: int, client_id: int) -> FitInstructions:
        return FitInstructions(
            round=round_num,
            seed=derive_seed(self.seed, "client-train", client_id, round_num),
            client_config=self.strategy.client_config(),
        )

    def downlink(self, round_num: int, client_id: int) -> bytes:
        """The global state and the strategy's extras as bytes for one client (counted as bytes down)."""
        tensors = pack(self.global_state, self.strategy.downlink_extras())
        payload = encode_state(tensors, self.wire_dtype, {ROUND_KEY: str(round_num)})
        self.bytes.record(round_num, client_id, "down", len(payload))
        return payload

    def receive(self, record: RoundRecord, client_id: int, payload: bytes) -> Update | None:
        """Validate one client's uplink bytes; keep the update or log why it was rejected."""
        self.bytes.record(record.round, client_id, "up", len(payload))
        try:
            update = decode_update(payload, self.uplink_spec, expected_client_id=client_id)
        except PayloadError as exc:
            self.reject(record, client_id, f"invalid payload: {exc}")
            return None
        try:
            self.strategy.validate_update(update)
        except ValueError as exc:
            self.reject(record, client_id, f"invalid update: {exc}")
            return None
        record.accepted.append(update)
        return update

    def reject(self, record: RoundRecord, client_id: int, reason: str) -> None:
        record.rejected[client_id] = reason
        log.warning("round %d: update of client %d rejected: %s", record.round, client_id, reason)

    def aggregate(self, record: RoundRecord) -> State:
        """Apply the strategy to the accepted updates; keep the old state when none arrived."""
        if not record.accepted:
            log.warning("round %d: no valid update arrived; the global prompt stays as it was", record.round)
        else:
            new_state = self.strategy.aggregate(self.global_state, record.accepted)
            bad = [name for name, t in new_state.items() if not bool(torch.isfinite(t).all())]
            if bad:
                raise FloatingPointError(
                    f"round {record.round}: aggregation produced non-finite values in {bad}"
                )
            self.global_state = clone_state(new_state)
        self.completed_rounds = record.round
        return self.global_state

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> tuple[State, dict[str, str]]:
        """Tensors and metadata that restore this server exactly (global state + strategy state)."""
        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        tensors.update({f"strategy/{k}": v for k, v in self.strategy.state_dict().items()})
        return tensors, {ROUND_KEY: str(self.completed_rounds)}

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
        self.completed_rounds = int(metadata[ROUND_KEY])
