"""A site's side of a securely aggregated round on Flower: the four stage messages of
``fedprompt.federation.secagg``, answered by the ClientApp.

The round's secrets (key pairs, self-mask seed, the shares other clients sent) live in the node's
Flower context between the stage messages, never on the server. At the masked-input stage the
ClientApp has its site fit as usual (in this process or in the site worker), reads the update and
the downlink it was computed from (as float64, without torch), and sends only the masked
quantisation of the weighted delta: no metric of the update or of its training goes beside it (the
site keeps those in its own log), and the only other thing it reports is which senders' encrypted
shares it could not read.

The site checks the server's parameters against its own configuration: it takes part only with its
own threshold, ring and clipping range, a weight in (0, 1], at most as many participants as a
round samples and at least ``secure_aggregation.min_survivors`` (its pin on the round size, which it
also holds the server to when unmasking); a site configured for secure aggregation refuses a plain
train message, and one that is not refuses the stages.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from fedprompt.config import RunConfig
from fedprompt.errors import PayloadError
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.secagg import ClientSession, SecAggError
from fedprompt.federation.secagg_primitives import RingQuantizer
from fedprompt.flower.records import payload_content, read_instructions, read_payload
from fedprompt.flower.secure_records import (
    SECAGG_RECORD,
    client_ids,
    encode_masked,
    float_arrays,
    paired,
    read_stage_request,
    reply_record,
)

log = logging.getLogger("fedprompt.flower")

SESSION_RECORD = "fedprompt.secagg-session"
"""The key of the ConfigRecord in ``Context.state`` that holds the round's client session."""
EXTRA_PREFIX = "extra/"


class Site(Protocol):
    """Where the ClientApp has a partition trained (this process, or the site worker)."""

    def fit(
        self, config: RunConfig, partition: int, instructions: FitInstructions, downlink: bytes
    ) -> bytes: ...


def answer_stage(
    content: RecordDict, context: Context, config: RunConfig, partition: int, site: Site
) -> RecordDict:
    """The reply content to one stage message for ``partition``; PayloadError or SecAggError (which
    the ServerApp records as the client's failure) when the message does not fit the protocol."""
    secure = config.secure_aggregation
    if not secure.enabled:
        raise PayloadError(
            "the server runs secure aggregation but this site's configuration does not enable it "
            "(secure_aggregation.enabled)"
        )
    stage, round_num, client_id, fields = read_stage_request(content)
    if client_id != partition:
        raise PayloadError(
            f"{stage} message is for client {client_id}; this node hosts partition {partition}"
        )
    if stage == "keys":
        return _keys(context, config, partition, round_num, fields)
    session = _session(context, round_num)
    if stage == "shares":
        ids = client_ids(fields["ids"], "shares: ids")
        c_pks = paired(ids, fields["c-pks"], "shares: c-pks")
        s_pks = paired(ids, fields["s-pks"], "shares: s-pks")
        ciphertexts = session.share({cid: (c_pks[cid], s_pks[cid]) for cid in ids})
        destinations = sorted(ciphertexts)
        record = reply_record(
            "shares", destinations=destinations, ciphertexts=[ciphertexts[v] for v in destinations]
        )
        out = RecordDict({SECAGG_RECORD: record})
    elif stage == "masked":
        out = _masked(content, session, config, partition, fields, site)
    else:
        survivors = client_ids(fields["survivors"], "unmask: survivors")
        dropped = client_ids(fields["dropped"], "unmask: dropped")
        reveal = client_ids(fields["reveal"], "unmask: reveal")
        seeds, keys, mask_keys = session.unmask(survivors, dropped, reveal)
        out = RecordDict(
            {
                SECAGG_RECORD: reply_record(
                    "unmask",
                    **{"seed-owners": sorted(seeds), "seed-shares": [seeds[v] for v in sorted(seeds)]},
                    **{"key-owners": sorted(keys), "key-shares": [keys[v] for v in sorted(keys)]},
                    **{
                        "mask-key-owners": sorted(mask_keys),
                        "mask-keys": [mask_keys[v] for v in sorted(mask_keys)],
                    },
                )
            }
        )
    _store(context, session)
    return out


def _keys(context: Context, config: RunConfig, partition: int, round_num: int, fields: dict) -> RecordDict:
    secure = config.secure_aggregation
    sampled = config.federation.clients_per_round(config.partition.num_clients)
    participants = client_ids(fields["participants"], "keys: participants")
    own = {"threshold": secure.threshold_for(sampled), "bits": secure.bits, "clip-range": secure.clip_range}
    differ = {k: (fields[k], v) for k, v in own.items() if fields[k] != v}
    if differ:
        raise SecAggError(
            f"the server's secure-aggregation settings differ from this site's (theirs, ours): {differ}"
        )
    if len(participants) > sampled:
        raise SecAggError(f"{len(participants)} participants, more than the {sampled} a round samples")
    session, advert = ClientSession.start(
        partition, round_num, participants, own["threshold"], secure.min_survivors
    )
    _store(context, session)
    return RecordDict({SECAGG_RECORD: reply_record("keys", **advert)})


def _masked(
    content: RecordDict, session: ClientSession, config: RunConfig, partition: int, fields: dict, site: Site
) -> RecordDict:
    secure = config.secure_aggregation
    weight = fields["weight"]
    if not 0 < weight <= 1:
        raise SecAggError(f"weight {weight} is not in (0, 1]")
    sources = client_ids(fields["sources"], "masked: sources")
    ciphertexts = paired(sources, fields["ciphertexts"], "masked: ciphertexts")
    client_id, instructions = read_instructions(content)
    if client_id != partition or instructions.round != session.round:
        raise PayloadError(
            f"masked-input message carries instructions for client {client_id}, round {instructions.round}"
        )
    downlink = read_payload(content, config.payload.max_bytes)
    update = site.fit(config, partition, instructions, downlink)
    delta = _delta(update, downlink)
    sampled = config.federation.clients_per_round(config.partition.num_clients)
    quantizer = RingQuantizer(secure.clip_range, secure.bits, sampled)
    quantized, clipped = quantizer.quantize(delta, weight)
    if clipped:
        log.info(
            "round %d: %d coordinates of this site's delta clipped to the clip range", session.round, clipped
        )
    masked = session.mask(ciphertexts, quantized, secure.bits)
    if session.unreadable:
        log.warning(
            "round %d: the encrypted shares of clients %s do not decrypt", session.round, session.unreadable
        )
    payload = encode_masked(masked, secure.bits, partition)
    return payload_content(
        payload, {SECAGG_RECORD: reply_record("masked", unreadable=list(session.unreadable))}
    )


def _delta(update: bytes, downlink: bytes) -> np.ndarray:
    """The update's delta from the downlink state, flat in name order, float64."""
    sent, _ = float_arrays(update)
    received, _ = float_arrays(downlink)
    names = sorted(name for name in sent if not name.startswith(EXTRA_PREFIX))
    if len(names) != len(sent):
        raise SecAggError("secure aggregation sums prompt tensors only; this update carries extras")
    missing = [n for n in names if n not in received or received[n].shape != sent[n].shape]
    if missing:
        raise SecAggError(f"update tensors {missing} do not match the downlink's")
    return np.concatenate([(sent[n] - received[n]).ravel() for n in names]) if names else np.zeros(0)


def _session(context: Context, round_num: int) -> ClientSession:
    record = context.state.config_records.get(SESSION_RECORD)
    if record is None:
        raise SecAggError("no secure-aggregation session on this node: the keys stage never reached it")
    session = ClientSession.from_record(dict(record))
    if session.round != round_num:
        raise SecAggError(
            f"this node's session is for round {session.round}, the message for round {round_num}"
        )
    return session


def _store(context: Context, session: ClientSession) -> None:
    context.state[SESSION_RECORD] = ConfigRecord(session.to_record())
