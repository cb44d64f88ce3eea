"""fedprompt's bytes and instructions inside Flower records, and back.

A payload travels unchanged: the safetensors bytes that fedprompt's ``encode_*`` produced become
the data of one ``Array`` (dtype ``uint8``, stype ``safetensors``) in an ``ArrayRecord``, and come
out as the same bytes, which fedprompt's own ``decode_*`` then validates. Flower never sees a
tensor and nothing is pickled. Everything read from a record is checked here first; a record
that does not have the expected shape raises :class:`~fedprompt.federation.payload.PayloadError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedprompt.errors import PayloadError
from fedprompt.federation.instructions import FitInstructions

PAYLOAD_RECORD = "fedprompt.payload"
"""RecordDict key of the ArrayRecord that carries a payload."""
PAYLOAD_ARRAY = "safetensors"
"""Name of the one Array in that record."""
PAYLOAD_STYPE = "safetensors"
"""The Array's serialisation type: its data are safetensors bytes, not a NumPy array."""
INSTRUCTIONS_RECORD = "fedprompt.instructions"
"""RecordDict key of the ConfigRecord with a client's fit instructions."""
NODE_RECORD = "fedprompt.node"
"""RecordDict key of the ConfigRecord a SuperNode answers a query with."""
EVAL_RECORD = "fedprompt.evaluation"
"""RecordDict key of the MetricRecord a client's local evaluation answers with."""
EVAL_INSTRUCTIONS_RECORD = "fedprompt.evaluation-instructions"
"""RecordDict key of the ConfigRecord naming the client an evaluate message is for."""

PARTITION_ID = "partition-id"
"""The SuperNode's ``--node-config`` key naming the data partition (fedprompt client id) it hosts."""
NUM_PARTITIONS = "num-partitions"
"""Optional ``--node-config`` key (set by Flower's simulation) with the number of partitions."""
NUM_EXAMPLES = "num-examples"
"""Optional ``--node-config`` key: the training examples the partition holds, declared when the node
first claims it; the server bounds that client's aggregation weight by it for the whole run."""
CLIENT_STATE_DIR = "client-state-dir"
"""``--node-config`` key of a folder where the node keeps its clients' carried states and its ledger
of releases across runs."""

_CLIENT_CONFIG_PREFIX = "client-config/"


def payload_record(data: bytes) -> ArrayRecord:
    """An ArrayRecord holding ``data`` (safetensors bytes) unchanged."""
    return ArrayRecord(
        {PAYLOAD_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=PAYLOAD_STYPE, data=bytes(data))}
    )


def payload_content(data: bytes, records: Mapping[str, ConfigRecord] | None = None) -> RecordDict:
    """A message content with the payload and, under their keys, further records."""
    return RecordDict({PAYLOAD_RECORD: payload_record(data), **(records or {})})


def read_payload(content: RecordDict, max_bytes: int) -> bytes:
    """The safetensors bytes a message carries, after checking the record's shape and size."""
    if PAYLOAD_RECORD not in content.array_records:
        raise PayloadError(f"message has no {PAYLOAD_RECORD!r} ArrayRecord")
    record = content.array_records[PAYLOAD_RECORD]
    if list(record) != [PAYLOAD_ARRAY]:
        raise PayloadError(f"{PAYLOAD_RECORD!r} must hold one array {PAYLOAD_ARRAY!r}, got {sorted(record)}")
    array = record[PAYLOAD_ARRAY]
    if array.stype != PAYLOAD_STYPE or array.dtype != "uint8":
        raise PayloadError(
            f"payload array has stype {array.stype!r} and dtype {array.dtype!r}, "
            f"expected {PAYLOAD_STYPE!r} and 'uint8'"
        )
    if len(array.data) > max_bytes:
        raise PayloadError(f"payload is {len(array.data)} bytes, over the limit of {max_bytes} bytes")
    if tuple(array.shape) != (len(array.data),):
        raise PayloadError(f"payload array has shape {tuple(array.shape)} but {len(array.data)} bytes")
    return bytes(array.data)


def instructions_record(client_id: int, instructions: FitInstructions) -> ConfigRecord:
    """The fit instructions for one client (its extras travel in the payload, not here)."""
    record = ConfigRecord(
        {
            "client-id": client_id,
            "round": instructions.round,
            "seed": instructions.seed,
            "accepted-round": instructions.accepted_round,
        }
    )
    for name, value in instructions.client_config.items():
        record[_CLIENT_CONFIG_PREFIX + name] = float(value)
    return record


def read_instructions(content: RecordDict) -> tuple[int, FitInstructions]:
    """(client id, fit instructions) from a train message; PayloadError names a missing or bad field."""
    if INSTRUCTIONS_RECORD not in content.config_records:
        raise PayloadError(f"message has no {INSTRUCTIONS_RECORD!r} ConfigRecord")
    record = content.config_records[INSTRUCTIONS_RECORD]
    known = {"client-id", "round", "seed", "accepted-round"}
    unexpected = sorted(k for k in record if k not in known and not k.startswith(_CLIENT_CONFIG_PREFIX))
    if unexpected:
        raise PayloadError(f"{INSTRUCTIONS_RECORD!r} has unexpected fields {unexpected}")
    client_id, round_num, seed, accepted = (
        _non_negative_int(record, key) for key in ("client-id", "round", "seed", "accepted-round")
    )
    if accepted >= round_num:
        raise PayloadError(
            f"{INSTRUCTIONS_RECORD!r}: accepted-round {accepted} is not before round {round_num}"
        )
    client_config = {}
    for key, value in record.items():
        if key.startswith(_CLIENT_CONFIG_PREFIX):
            if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
                raise PayloadError(f"{INSTRUCTIONS_RECORD!r} field {key!r} must be a finite float")
            client_config[key.removeprefix(_CLIENT_CONFIG_PREFIX)] = value
    return client_id, FitInstructions(
        round=round_num, seed=seed, client_config=client_config, accepted_round=accepted
    )


def evaluation_record(client_id: int, accepted_round: int) -> ConfigRecord:
    """Which client an evaluate message is for, and the last round the server used its update (the
    client evaluates its personal prompt from the state it carries since that round)."""
    return ConfigRecord({"client-id": client_id, "accepted-round": accepted_round})


def read_evaluation_record(content: RecordDict) -> tuple[int, int]:
    """(client id, accepted round) of an evaluate message."""
    if EVAL_INSTRUCTIONS_RECORD not in content.config_records:
        raise PayloadError(f"message has no {EVAL_INSTRUCTIONS_RECORD!r} ConfigRecord")
    record = content.config_records[EVAL_INSTRUCTIONS_RECORD]
    unexpected = sorted(set(record) - {"client-id", "accepted-round"})
    if unexpected:
        raise PayloadError(f"{EVAL_INSTRUCTIONS_RECORD!r} has unexpected fields {unexpected}")
    return _non_negative_int(record, "client-id"), _non_negative_int(record, "accepted-round")


def node_record(partition_id: int, num_examples: int | None = None) -> ConfigRecord:
    """A SuperNode's answer to the partition query: the partition it hosts and, when the site
    declares it, the partition's training-example count."""
    record = ConfigRecord({PARTITION_ID: partition_id})
    if num_examples is not None:
        record[NUM_EXAMPLES] = num_examples
    return record


def read_node_reply(content: RecordDict) -> tuple[int, int | None]:
    """(the partition id, the declared example count or None) in a query reply."""
    if NODE_RECORD not in content.config_records:
        raise PayloadError(f"message has no {NODE_RECORD!r} ConfigRecord")
    record = content.config_records[NODE_RECORD]
    unexpected = sorted(set(record) - {PARTITION_ID, NUM_EXAMPLES})
    if unexpected:
        raise PayloadError(f"{NODE_RECORD!r} has unexpected fields {unexpected}")
    count = _non_negative_int(record, NUM_EXAMPLES) if NUM_EXAMPLES in record else None
    if count == 0:
        raise PayloadError(f"field {NUM_EXAMPLES!r} must be a positive integer, got 0")
    return _non_negative_int(record, PARTITION_ID), count


def _non_negative_int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadError(f"field {key!r} must be a non-negative integer, got {value!r}")
    return value
