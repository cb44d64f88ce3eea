"""One securely aggregated round on the ServerApp's side: the four stages of ``fedprompt.secagg``
through the Flower grid, then fedprompt's Server and Strategy on what they reveal.

Weights are public and fixed before masking: uniform, or the example count each site declared when
it registered (``secure_aggregation.weights``); each client scales its clipped delta by
p_k = w_k / max_j w_j over the round's participants. The unmasked ring sum gives the weighted mean
delta Σ p_k Δ_k / Σ p_k of the survivors, to the quantisation error ``RingQuantizer`` states; the
server adds it to the global state as the clients received it (in the wire dtype), and each
survivor's :class:`~fedprompt.state.Update` carries that same aggregate with its weight w_k — the
server knows nothing else of any client's update — so a strategy whose step depends on the weighted
mean only (FedAvg, FedProx, FedOpt; the configuration refuses the others) aggregates exactly the
secure result, and the bookkeeping (client rows, accepted rounds for the clients' carried states,
checkpoints) is that of a plain round. A client that fails or does not answer a stage is rejected
with the stage in its reason; when fewer than the threshold remain at any stage, or fewer than
``federation.min_clients`` survive, the round stops with :class:`NotEnoughClientsError`.
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
from fedprompt.flower.records import INSTRUCTIONS_RECORD, instructions_record, payload_content, read_payload
from fedprompt.flower.secure_records import (
    SECAGG_RECORD,
    client_ids,
    decode_masked,
    paired,
    read_stage_reply,
    stage_record,
)
from fedprompt.flower.strategy import FedPromptStrategy, NotEnoughClientsError, match_replies
from fedprompt.payload import WIRE_DTYPES, parse_metrics
from fedprompt.secagg import RingQuantizer, SecAggError, ServerSession
from fedprompt.server import RoundRecord
from fedprompt.state import State, Update
from fedprompt.update_pipeline import UpdateRejected, check_metrics

log = logging.getLogger("fedprompt.flower")


def secure_train_round(
    strategy: FedPromptStrategy, grid: Grid, round_num: int, settings: SecureAggregationConfig, timeout: float
) -> RoundRecord:
    """Run round ``round_num`` with secure aggregation and aggregate it; the round's record."""
    server = strategy.server
    record = server.begin_round(round_num)
    strategy.last_record = record
    quantizer = RingQuantizer(settings.clip_range, settings.bits, len(record.sampled))
    threshold = settings.threshold_for(len(record.sampled))
    weights = _weights(strategy, record, settings)
    shapes = server.strategy.uplink_shapes(server.global_state)
    names = sorted(shapes)
    length = sum(int(np.prod(shapes[n], dtype=np.int64)) for n in names)

    def fail(stage: str, cid: int, reason: str) -> None:
        """Reject a client that failed a stage; a survivor failing to unmask stays in the sum (its
        input is unmasked with the others' shares), so that is only logged."""
        if stage == "unmask":
            log.warning("round %d: client %d did not help unmask: %s", round_num, cid, reason)
        else:
            server.reject(record, cid, f"secure aggregation, stage {stage}: {reason}")

    def send(stage: str, clients: Iterable[int], make: Callable[[int], RecordDict]) -> dict[int, Message]:
        """The stage's messages to ``clients``; the valid replies (failures rejected with the stage)."""
        messages = {
            cid: Message(
                make(cid),
                dst_node_id=strategy.nodes[cid],
                message_type=MessageType.TRAIN,
                group_id=f"{round_num}",
                ttl=strategy.message_ttl,
            )
            for cid in clients
        }
        replies = {}
        answers = match_replies(messages, grid.send_and_receive(list(messages.values()), timeout=timeout))
        for cid, reply in sorted(answers.items()):
            if reply is None:
                fail(stage, cid, "no reply before the round timeout")
            elif reply.has_error():
                fail(stage, cid, f"client failed: {reply.error.reason}")
            else:
                replies[cid] = reply
        return replies

    def accept(stage: str, cid: int, add: Callable[[], None]) -> None:
        try:
            add()
        except (PayloadError, SecAggError, UpdateRejected) as exc:
            fail(stage, cid, str(exc))

    try:
        participants = sorted(weights)
        session = ServerSession(round_num, participants, threshold, settings.bits, length)
        common = {"participants": participants, "threshold": threshold, "bits": settings.bits}
        replies = send(
            "keys",
            participants,
            lambda cid: _request("keys", round_num, cid, **common, **{"clip-range": settings.clip_range}),
        )
        for cid, reply in replies.items():
            accept("keys", cid, lambda cid=cid, reply=reply: session.add_keys(cid, *_keys(reply)))
        keys = session.keys_done()

        ids = sorted(keys)
        listing = {"ids": ids, "c-pks": [keys[c][0] for c in ids], "s-pks": [keys[c][1] for c in ids]}
        replies = send("shares", ids, lambda cid: _request("shares", round_num, cid, **listing))
        for cid, reply in replies.items():
            accept("shares", cid, lambda cid=cid, reply=reply: session.add_shares(cid, _shares(reply)))
        masked_with = session.shares_done()

        top = max(weights[c] for c in masked_with)
        updates: dict[int, dict[str, float]] = {}

        def masked_request(cid: int) -> RecordDict:
            forwarded = session.forwarded(cid)
            content = payload_content(
                server.downlink(round_num, cid),
                {INSTRUCTIONS_RECORD: instructions_record(cid, server.instructions(round_num, cid))},
            )
            content[SECAGG_RECORD] = stage_record(
                "masked",
                round_num,
                cid,
                weight=weights[cid] / top,
                sources=sorted(forwarded),
                ciphertexts=[forwarded[s] for s in sorted(forwarded)],
            )
            return content

        def take_masked(cid: int, reply: Message) -> None:
            data = read_payload(reply.content, server.max_bytes)
            server.bytes.record(round_num, cid, "up", len(data))
            read_stage_reply(reply.content, "masked")
            masked, sender, metrics_json = decode_masked(data, length, settings.bits, server.max_bytes)
            if sender != cid:
                raise PayloadError(f"masked input names client {sender}")
            metrics = parse_metrics(metrics_json)
            check_metrics(metrics)
            session.add_masked(cid, masked)
            updates[cid] = metrics

        for cid, reply in send("masked", masked_with, masked_request).items():
            accept("masked", cid, lambda cid=cid, reply=reply: take_masked(cid, reply))
        survivors, dropped = session.masked_done()
        if dropped:
            log.warning(
                "round %d: clients %s dropped after the key exchange; their masks come off",
                round_num,
                dropped,
            )

        lists = {"survivors": survivors, "dropped": dropped}
        for cid, reply in send(
            "unmask", survivors, lambda cid: _request("unmask", round_num, cid, **lists)
        ).items():
            accept("unmask", cid, lambda cid=cid, reply=reply: session.add_unmask(cid, *_unmask(reply)))
        ring_sum = session.result()
    except SecAggError as exc:
        raise NotEnoughClientsError(f"{exc}; rejected: {record.rejected}") from None

    if len(survivors) < server.min_clients:
        raise NotEnoughClientsError(
            f"round {round_num}: {len(survivors)} clients' inputs were summed, fewer than "
            f"federation.min_clients={server.min_clients}; rejected: {record.rejected}"
        )
    total = sum(weights[c] / top for c in survivors)
    mean = quantizer.mean(ring_sum, total)
    state = _aggregate_state(server.global_state, server.wire_dtype, names, shapes, mean)
    record.accepted.extend(Update(cid, state, weights[cid], updates[cid]) for cid in survivors)
    log.info(
        "round %d: securely summed %d clients' updates (quantisation error <= %.3g per coordinate)",
        round_num,
        len(survivors),
        quantizer.max_error(len(survivors), total),
    )
    server.aggregate(record)
    return record


def _weights(
    strategy: FedPromptStrategy, record: RoundRecord, settings: SecureAggregationConfig
) -> dict[int, int]:
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
    return weights


def _aggregate_state(
    global_state: State,
    wire_dtype: str,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    mean: np.ndarray,
) -> State:
    """The global state as the clients received it (cast through the wire dtype) plus the mean delta,
    in float64."""
    out, offset = {}, 0
    for name in names:
        size = int(np.prod(shapes[name], dtype=np.int64))
        base = global_state[name].to(WIRE_DTYPES[wire_dtype]).to(torch.float64)
        delta = torch.from_numpy(mean[offset : offset + size].reshape(shapes[name]).copy())
        out[name] = base + delta
        offset += size
    return out


def _request(stage: str, round_num: int, cid: int, **fields: object) -> RecordDict:
    return RecordDict({SECAGG_RECORD: stage_record(stage, round_num, cid, **fields)})


def _keys(reply: Message) -> tuple[bytes, bytes, bytes]:
    fields = read_stage_reply(reply.content, "keys")
    return fields["c-pk"], fields["s-pk"], fields["seed-hash"]


def _shares(reply: Message) -> dict[int, bytes]:
    fields = read_stage_reply(reply.content, "shares")
    return paired(fields["destinations"], fields["ciphertexts"], "shares")


def _unmask(reply: Message) -> tuple[dict[int, bytes], dict[int, bytes]]:
    fields = read_stage_reply(reply.content, "unmask")
    seeds = paired(fields["seed-owners"], fields["seed-shares"], "unmask: seed shares")
    keys = paired(fields["key-owners"], fields["key-shares"], "unmask: key shares")
    client_ids(list(seeds) + list(keys), "unmask: owners")  # no client both alive and dropped
    return seeds, keys
