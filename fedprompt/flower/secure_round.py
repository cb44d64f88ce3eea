"""One securely aggregated round on the ServerApp's side: the four stages of ``fedprompt.federation.secagg``
through the Flower grid, then fedprompt's Server and Strategy on what they reveal.

Weights are public and fixed before masking: uniform, or the example count each site declared when
it registered (``secure_aggregation.weights``); each client scales its clipped delta by
p_k = w_k / max_j w_j over the clients left at the masked-input stage. The unmasked ring sum
gives the weighted mean delta Σ p_k Δ_k / Σ p_k of the survivors, to the quantisation error
``RingQuantizer`` states; the
server adds it to the global state as the clients received it (in the wire dtype), and each
survivor's :class:`~fedprompt.federation.state.Update` carries that same aggregate with its weight w_k — the
server knows nothing else of any client's update — so a strategy whose step depends on the weighted
mean only (FedAvg, FedProx, FedAvgM, FedOpt; the configuration refuses the others) aggregates exactly the
secure result, and the bookkeeping (client rows, accepted rounds for the clients' carried states,
checkpoints) is that of a plain round. A client that fails or does not answer a stage is rejected
with the stage in its reason; when fewer than the threshold remain at any stage, or fewer than
``federation.min_clients`` survive (checked before anyone is asked to unmask), the round stops with
:class:`NotEnoughClientsError`. A client whose encrypted shares too few others could read is dropped
(rejected with that reason) and the round goes on; an unmask answer with wrong shares is logged with
its sender and the secrets are rebuilt from the others' shares. Nothing but the masked vector and
the list of unreadable senders comes back with a masked input: no metric rides beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedprompt.config import SecureAggregationConfig
from fedprompt.errors import PayloadError
from fedprompt.federation.payload import WIRE_DTYPES
from fedprompt.federation.secagg import SecAggError, ServerSession
from fedprompt.federation.secagg_primitives import RingQuantizer
from fedprompt.federation.server import RoundRecord
from fedprompt.federation.state import State, Update
from fedprompt.federation.update_pipeline import UpdateRejected
from fedprompt.flower.records import INSTRUCTIONS_RECORD, instructions_record, payload_content, read_payload
from fedprompt.flower.rounds import NotEnoughClientsError, RoundHost, match_replies
from fedprompt.flower.secure_records import (
    SECAGG_RECORD,
    client_ids,
    decode_masked,
    paired,
    read_stage_reply,
    stage_record,
)

log = logging.getLogger("fedprompt.flower")


class SecureRound:
    """Owns one secure round on the server: its record, the protocol session, the public weights,
    and the message exchange of each stage through the grid."""

    def __init__(
        self,
        strategy: RoundHost,
        grid: Grid,
        round_num: int,
        settings: SecureAggregationConfig,
        timeout: float,
    ) -> None:
        self.strategy, self.grid, self.round, self.timeout = strategy, grid, round_num, timeout
        self.server = strategy.server
        self.settings = settings
        self.record = self.server.begin_round(round_num)
        strategy.last_record = self.record
        sampled = len(self.record.sampled)
        self.quantizer = RingQuantizer(settings.clip_range, settings.bits, sampled)
        self.threshold = settings.threshold_for(sampled)
        self.weights = _weights(strategy, self.record, settings)
        self.shapes = self.server.strategy.uplink_shapes(self.server.global_state)
        self.length = sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())

    def run(self) -> RoundRecord:
        """The four stages, then the strategy on the unmasked mean; NotEnoughClientsError when too
        few clients remain."""
        try:
            session = ServerSession(
                self.round, sorted(self.weights), self.threshold, self.settings.bits, self.length
            )
            self._keys(session)
            self._shares(session)
            survivors, top = self._masked(session)
            if len(survivors) < self.server.min_clients:  # before anyone helps unmask
                raise NotEnoughClientsError(
                    f"round {self.round}: {len(survivors)} clients' inputs would be summed, fewer than "
                    f"federation.min_clients={self.server.min_clients}; nothing was unmasked. Rejected: "
                    f"{self.record.rejected}"
                )
            self._unmask(session, survivors)
            ring_sum = session.result()
        except SecAggError as exc:
            raise NotEnoughClientsError(f"{exc}; rejected: {self.record.rejected}") from None
        for cid, owners in sorted(session.wrong_shares.items()):
            log.warning(
                "round %d: client %d sent wrong shares of the secrets of %s; rebuilt from the others' shares",
                self.round,
                cid,
                owners,
            )
        total = sum(self.weights[c] / top for c in survivors)
        mean = self.quantizer.mean(ring_sum, total)
        state = _aggregate_state(self.server.global_state, self.server.wire_dtype, self.shapes, mean)
        self.record.accepted.extend(Update(c, state, self.weights[c]) for c in survivors)
        log.info(
            "round %d: securely summed %d clients' updates (quantisation error <= %.3g per coordinate)",
            self.round,
            len(survivors),
            self.quantizer.max_error(len(survivors), total),
        )
        self.server.aggregate(self.record)
        return self.record

    # ------------------------------------------------------------------ the stages

    def _keys(self, session: ServerSession) -> None:
        fields = {
            "participants": session.participants,
            "threshold": self.threshold,
            "bits": self.settings.bits,
            "clip-range": self.settings.clip_range,
        }
        for cid, reply in self._send(
            "keys", session.participants, lambda cid: self._request("keys", cid, fields)
        ):
            self._take("keys", cid, lambda cid=cid, reply=reply: session.add_keys(cid, *_read_keys(reply)))

    def _shares(self, session: ServerSession) -> None:
        keys = session.keys_done()
        ids = sorted(keys)
        fields = {"ids": ids, "c-pks": [keys[c][0] for c in ids], "s-pks": [keys[c][1] for c in ids]}
        for cid, reply in self._send("shares", ids, lambda cid: self._request("shares", cid, fields)):
            self._take(
                "shares", cid, lambda cid=cid, reply=reply: session.add_shares(cid, _read_shares(reply))
            )

    def _masked(self, session: ServerSession) -> tuple[list[int], int]:
        """(the survivors, the largest weight, which scales every weight into (0, 1])."""
        masked_with = session.shares_done()
        top = max(self.weights[c] for c in masked_with)

        def request(cid: int) -> RecordDict:
            forwarded = session.forwarded(cid)
            content = payload_content(
                self.server.downlink(self.round, cid),
                {INSTRUCTIONS_RECORD: instructions_record(cid, self.server.instructions(self.round, cid))},
            )
            content[SECAGG_RECORD] = stage_record(
                "masked",
                self.round,
                cid,
                weight=self.weights[cid] / top,
                sources=sorted(forwarded),
                ciphertexts=[forwarded[s] for s in sorted(forwarded)],
            )
            return content

        if self.strategy.before_uploads is not None:
            self.strategy.before_uploads(self.round)
        for cid, reply in self._send("masked", masked_with, request):
            self._take("masked", cid, lambda cid=cid, reply=reply: self._read_masked(session, cid, reply))
        survivors, dropped = session.masked_done()
        for cid in session.reveal:
            if cid not in self.record.rejected:
                self.server.reject(
                    self.record,
                    cid,
                    "secure aggregation, stage masked: fewer than the threshold of the other clients could "
                    "decrypt the shares it sent; dropped, its masks come off with the others' mask keys",
                )
        if dropped:
            log.warning(
                "round %d: clients %s dropped after the key exchange; their masks come off",
                self.round,
                dropped,
            )
        return survivors, top

    def _read_masked(self, session: ServerSession, cid: int, reply: Message) -> None:
        data = read_payload(reply.content, self.server.max_bytes)
        self.server.bytes.record(self.round, cid, "up", len(data))
        fields = read_stage_reply(reply.content, "masked")
        unreadable = client_ids(fields["unreadable"], "masked: unreadable")
        masked, sender = decode_masked(data, self.length, self.settings.bits, self.server.max_bytes)
        if sender != cid:
            raise PayloadError(f"masked input names client {sender}")
        session.add_masked(cid, masked, unreadable)

    def _unmask(self, session: ServerSession, survivors: list[int]) -> None:
        fields = {"survivors": survivors, "dropped": session.dropped, "reveal": session.reveal}
        for cid, reply in self._send("unmask", survivors, lambda cid: self._request("unmask", cid, fields)):
            self._take(
                "unmask", cid, lambda cid=cid, reply=reply: session.add_unmask(cid, *_read_unmask(reply))
            )

    # ------------------------------------------------------------------ messages

    def _request(self, stage: str, cid: int, fields: dict[str, object]) -> RecordDict:
        return RecordDict({SECAGG_RECORD: stage_record(stage, self.round, cid, **fields)})

    def _send(
        self, stage: str, clients: Iterable[int], make: Callable[[int], RecordDict]
    ) -> list[tuple[int, Message]]:
        """The stage's messages to ``clients``; (client, reply) of the valid replies, in client order
        (a missing or failed reply fails its client)."""
        messages = {
            cid: Message(
                make(cid),
                dst_node_id=self.strategy.nodes[cid],
                message_type=MessageType.TRAIN,
                group_id=str(self.round),
                ttl=self.strategy.message_ttl,
            )
            for cid in clients
        }
        replies = []
        answers = match_replies(
            messages, self.grid.send_and_receive(list(messages.values()), timeout=self.timeout)
        )
        for cid, reply in sorted(answers.items()):
            if reply is None:
                self._fail(stage, cid, "no reply before the round timeout")
            elif reply.has_error():
                self._fail(stage, cid, f"client failed: {reply.error.reason}")
            else:
                replies.append((cid, reply))
        return replies

    def _take(self, stage: str, cid: int, read: Callable[[], None]) -> None:
        """Read one client's reply into the session; a reply that breaks the protocol fails it."""
        try:
            read()
        except (PayloadError, SecAggError, UpdateRejected) as exc:
            self._fail(stage, cid, str(exc))

    def _fail(self, stage: str, cid: int, reason: str) -> None:
        """Reject a client that failed a stage; a survivor failing to unmask stays in the sum (its
        input is unmasked with the others' shares), so that is only logged."""
        if stage == "unmask":
            log.warning("round %d: client %d did not help unmask: %s", self.round, cid, reason)
        else:
            self.server.reject(self.record, cid, f"secure aggregation, stage {stage}: {reason}")


def _weights(strategy: RoundHost, record: RoundRecord, settings: SecureAggregationConfig) -> dict[int, int]:
    """Client id -> its public weight, for the sampled clients that can take part (a node hosts
    them and, with declared weights, they declared a count); the others are rejected."""
    server = strategy.server
    weights = {}
    for cid in record.sampled:
        if cid not in strategy.nodes:
            server.reject(record, cid, f"no SuperNode hosts partition {cid}")
            continue
        bound = server.example_bounds.bound(cid) if settings.weights == "declared" else 1
        if bound is None:
            server.reject(
                record,
                cid,
                "secure_aggregation.weights is 'declared' but this partition declared no example count "
                "(node config num-examples) and robustness.max_examples is not set",
            )
            continue
        weights[cid] = bound
    limit = server.example_bounds.relative_limit(list(weights.values()))
    if limit is not None and settings.weights == "declared":
        for cid, weight in weights.items():
            if weight > limit:
                log.warning(
                    "round %d: client %d declared %d examples, over %g x the round's median; weighted %d",
                    record.round,
                    cid,
                    weight,
                    server.example_bounds.max_ratio,
                    limit,
                )
                weights[cid] = limit
    return weights


def _aggregate_state(
    global_state: State, wire_dtype: str, shapes: dict[str, tuple[int, ...]], mean: np.ndarray
) -> State:
    """The global state as the clients received it (cast through the wire dtype) plus the mean delta
    (flat, in name order), in float64."""
    out, offset = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name], dtype=np.int64))
        base = global_state[name].to(WIRE_DTYPES[wire_dtype]).to(torch.float64)
        delta = torch.from_numpy(mean[offset : offset + size].reshape(shapes[name]).copy())
        out[name] = base + delta
        offset += size
    return out


def _read_keys(reply: Message) -> tuple[bytes, bytes, bytes]:
    fields = read_stage_reply(reply.content, "keys")
    return fields["c-pk"], fields["s-pk"], fields["seed-hash"]


def _read_shares(reply: Message) -> dict[int, bytes]:
    fields = read_stage_reply(reply.content, "shares")
    return paired(fields["destinations"], fields["ciphertexts"], "shares")


def _read_unmask(reply: Message) -> tuple[dict[int, bytes], dict[int, bytes], dict[int, bytes]]:
    fields = read_stage_reply(reply.content, "unmask")
    seeds = paired(fields["seed-owners"], fields["seed-shares"], "unmask: seed shares")
    keys = paired(fields["key-owners"], fields["key-shares"], "unmask: key shares")
    mask_keys = paired(fields["mask-key-owners"], fields["mask-keys"], "unmask: mask keys")
    client_ids(list(seeds) + list(keys), "unmask: owners")  # no client both alive and dropped
    return seeds, keys, mask_keys
