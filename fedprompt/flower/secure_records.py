"""The messages of a securely aggregated round (``fedprompt.federation.secagg``) as Flower records, and back.

Every stage is a Flower ``train`` message with a ConfigRecord under :data:`SECAGG_RECORD` naming
the stage, the round and the client; the masked-input stage also carries the usual downlink payload
and fit instructions, and its reply carries the masked vector as safetensors bytes (one unsigned
tensor ``masked``; the client id in the header, and nothing else: no metric of the update or of its
training goes beside a masked input) in place of an update, and the senders whose encrypted shares
the client could not read.
Everything read from a record is checked here; a record that does not have the expected shape
raises :class:`~fedprompt.errors.PayloadError`. Torch-free: the ClientApp that relays to a site
worker imports it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from safetensors import SafetensorError, deserialize
from safetensors.numpy import save

from fedprompt.errors import PayloadError

SECAGG_RECORD = "fedprompt.secagg"
"""RecordDict key of the ConfigRecord of a secure-aggregation stage (both directions)."""
STAGES = ("keys", "shares", "masked", "unmask")
MASKED_TENSOR = "masked"
CLIENT_ID_KEY = "fedprompt.client_id"

_REQUEST_FIELDS: dict[str, dict[str, type]] = {
    "keys": {"participants": list, "threshold": int, "bits": int, "clip-range": float},
    "shares": {"ids": list, "c-pks": list, "s-pks": list},
    "masked": {"weight": float, "sources": list, "ciphertexts": list},
    "unmask": {"survivors": list, "dropped": list, "reveal": list},
}
_REPLY_FIELDS: dict[str, dict[str, type]] = {
    "keys": {"c-pk": bytes, "s-pk": bytes, "seed-hash": bytes},
    "shares": {"destinations": list, "ciphertexts": list},
    "masked": {"unreadable": list},
    "unmask": {
        "seed-owners": list,
        "seed-shares": list,
        "key-owners": list,
        "key-shares": list,
        "mask-key-owners": list,
        "mask-keys": list,
    },
}


def stage_record(stage: str, round_num: int, client_id: int, **fields: Any) -> ConfigRecord:
    """The ConfigRecord of a stage request (server to client) for ``client_id``."""
    return ConfigRecord({"stage": stage, "round": round_num, "client-id": client_id, **fields})


def read_stage_request(content: RecordDict) -> tuple[str, int, int, dict[str, Any]]:
    """(stage, round, client id, the stage's fields) of a stage request, checked."""
    record = _record(content)
    stage = record.get("stage")
    if stage not in STAGES:
        raise PayloadError(f"{SECAGG_RECORD!r}: unknown stage {stage!r}; expected one of {list(STAGES)}")
    fields = _fields(record, {"stage": str, "round": int, "client-id": int, **_REQUEST_FIELDS[stage]})
    return stage, fields.pop("round"), fields.pop("client-id"), fields


def reply_record(stage: str, **fields: Any) -> ConfigRecord:
    """The ConfigRecord of a client's answer to ``stage``."""
    return ConfigRecord({"stage": stage, **fields})


def read_stage_reply(content: RecordDict, stage: str) -> dict[str, Any]:
    """The fields of a client's answer to ``stage``, checked."""
    record = _record(content)
    if record.get("stage") != stage:
        raise PayloadError(f"{SECAGG_RECORD!r} answers stage {record.get('stage')!r}, expected {stage!r}")
    fields = _fields(record, {"stage": str, **_REPLY_FIELDS[stage]})
    fields.pop("stage")
    return fields


def paired(keys: list[Any], values: list[Any], what: str, kind: type = bytes) -> dict[int, Any]:
    """Two parallel lists as a mapping (client id -> value), checked: ints, no repeats, equal lengths."""
    if len(keys) != len(values):
        raise PayloadError(f"{what}: {len(keys)} client ids but {len(values)} values")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in keys) or len(set(keys)) != len(
        keys
    ):
        raise PayloadError(f"{what}: client ids must be distinct non-negative integers")
    if any(not isinstance(v, kind) for v in values):
        raise PayloadError(f"{what}: values must be {kind.__name__}")
    return dict(zip(keys, values, strict=True))


def client_ids(values: list[Any], what: str) -> list[int]:
    """A list of distinct client ids, checked."""
    return sorted(paired(values, values, what, int))


def encode_masked(masked: np.ndarray, bits: int, client_id: int) -> bytes:
    """A masked input as safetensors bytes: uint32 when the ring fits, else uint64; the header names
    the client and holds nothing else."""
    dtype = np.uint32 if bits <= 32 else np.uint64
    return save(
        {MASKED_TENSOR: np.ascontiguousarray(masked, dtype=dtype)}, metadata={CLIENT_ID_KEY: str(client_id)}
    )


def decode_masked(data: bytes, length: int, bits: int, max_bytes: int) -> tuple[np.ndarray, int]:
    """(the masked vector as uint64, the client id) of a masked-input payload, after checking its
    size, tensor, dtype, shape and metadata (the client id alone); the values' range is the server
    session's to check."""
    if len(data) > max_bytes:
        raise PayloadError(f"masked input is {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        views = dict(deserialize(data))
    except SafetensorError as exc:
        raise PayloadError(f"masked input is not valid safetensors: {exc}") from None
    expected = "U32" if bits <= 32 else "U64"
    view = views.get(MASKED_TENSOR)
    if set(views) != {MASKED_TENSOR} or view is None:
        raise PayloadError(f"masked input must hold one tensor {MASKED_TENSOR!r}, got {sorted(views)}")
    if view["dtype"] != expected or tuple(view["shape"]) != (length,):
        raise PayloadError(
            f"masked input is {view['dtype']} of shape {tuple(view['shape'])}, expected {expected} of "
            f"shape ({length},)"
        )
    metadata = _header(data).get("__metadata__", {})
    if set(metadata) != {CLIENT_ID_KEY}:
        raise PayloadError(
            f"masked input metadata {sorted(metadata)}, expected {[CLIENT_ID_KEY]}: nothing goes beside a "
            "masked input"
        )
    if not metadata[CLIENT_ID_KEY].isdigit():
        raise PayloadError(f"{CLIENT_ID_KEY} is {metadata[CLIENT_ID_KEY][:20]!r}, not a client id")
    values = np.frombuffer(bytes(view["data"]), dtype="<u4" if bits <= 32 else "<u8").astype(np.uint64)
    return values, int(metadata[CLIENT_ID_KEY])


_FLOAT_CODES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def float_arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of fedprompt safetensors bytes (fp32, fp16 or bf16) as float64 arrays, and the
    header's metadata: how the ClientApp reads its own update and the downlink without torch."""
    try:
        views = deserialize(data)
    except SafetensorError as exc:
        raise PayloadError(f"payload is not valid safetensors: {exc}") from None
    arrays = {}
    for name, view in views:
        raw = bytes(view["data"])
        if view["dtype"] == "BF16":  # the high half of a float32
            flat = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
        elif view["dtype"] in _FLOAT_CODES:
            flat = np.frombuffer(raw, dtype=_FLOAT_CODES[view["dtype"]])
        else:
            raise PayloadError(f"tensor {name!r} has dtype {view['dtype']}, not a float")
        arrays[name] = flat.astype(np.float64).reshape(view["shape"])
    return arrays, _header(data).get("__metadata__", {})


def _header(data: bytes) -> dict[str, Any]:
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise PayloadError(f"payload header is not valid: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise PayloadError("payload header is not a JSON object")
    return header


def _record(content: RecordDict) -> ConfigRecord:
    if SECAGG_RECORD not in content.config_records:
        raise PayloadError(f"message has no {SECAGG_RECORD!r} ConfigRecord")
    return content.config_records[SECAGG_RECORD]


def _fields(record: Mapping[str, Any], expected: dict[str, type]) -> dict[str, Any]:
    unexpected = sorted(set(record) - set(expected))
    missing = sorted(set(expected) - set(record))
    if unexpected or missing:
        raise PayloadError(f"{SECAGG_RECORD!r}: missing fields {missing}, unexpected fields {unexpected}")
    out = {}
    for key, kind in expected.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            raise PayloadError(f"{SECAGG_RECORD!r} field {key!r} must be a {kind.__name__}, got {value!r}")
        out[key] = value
    return out
