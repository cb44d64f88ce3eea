"""The wire format: prompt states and client updates as safetensors bytes, validated on arrival.

Everything that crosses a process or network boundary goes through ``encode_*`` and ``decode_*``.
Decoding trusts nothing: it checks the size limit before parsing, then the tensor names, shapes,
dtypes and finiteness against a :class:`PayloadSpec`, and for updates the metadata fields. Any
failure is a :class:`PayloadError` whose message names what is wrong. Never pickle, never
``torch.load``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from safetensors import SafetensorError, deserialize
from safetensors.torch import save

from fedprompt.errors import PayloadError
from fedprompt.federation.state import EXTRA_PREFIX, State, Update, pack, unpack

WIRE_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
)
"""Wire dtype name -> torch dtype."""

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_DTYPE_NAMES = {code: name for name, code in _SAFETENSORS_DTYPES.items()}

CLIENT_ID_KEY = "fedprompt.client_id"
NUM_EXAMPLES_KEY = "fedprompt.num_examples"
METRICS_KEY = "fedprompt.metrics"
UPDATE_METADATA_KEYS = (CLIENT_ID_KEY, NUM_EXAMPLES_KEY, METRICS_KEY)

_INTEGER = re.compile(r"[0-9]{1,20}")  # at most 20 digits: every u64, and int() never hits its digit limit

MAX_METRICS = 64
"""Most metrics one update may carry."""
MAX_METRICS_BYTES = 8192
"""Largest JSON text of an update's metrics."""
METRIC_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")
"""What a metric name may look like: lower-case words, digits, '_' and '.', at most 64 characters."""

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")


def _torch_dtype(wire_dtype: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[wire_dtype]
    except KeyError:
        raise ValueError(f"wire_dtype {wire_dtype!r} is unknown; choose one of {list(WIRE_DTYPES)}") from None


@dataclass(frozen=True)
class PayloadSpec:
    """What an arriving payload must hold: exact tensor names and shapes, the wire dtype, a size limit."""

    shapes: Mapping[str, tuple[int, ...]]
    wire_dtype: str
    max_bytes: int

    def __post_init__(self) -> None:
        _torch_dtype(self.wire_dtype)
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        frozen = MappingProxyType({name: tuple(int(d) for d in shape) for name, shape in self.shapes.items()})
        object.__setattr__(self, "shapes", frozen)

    @classmethod
    def for_state(
        cls,
        state: State,
        wire_dtype: str,
        max_bytes: int,
        extras: Mapping[str, tuple[int, ...]] | None = None,
    ) -> PayloadSpec:
        """The spec a payload of ``state`` (e.g. the global prompt state) meets, plus the shapes of
        the extra tensors a strategy exchanges (sent as ``extra/<name>``)."""
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        shapes.update({EXTRA_PREFIX + name: tuple(shape) for name, shape in (extras or {}).items()})
        return cls(shapes, wire_dtype, max_bytes)


# --------------------------------------------------------------------------- states


def encode_state(state: State, wire_dtype: str, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``state`` as safetensors bytes, its tensors cast to ``wire_dtype`` on the CPU.

    ``metadata`` goes into the safetensors header. The same input always gives the same bytes.
    Raises ValueError for an unknown wire dtype or a tensor that is not floating point (casting
    it would silently change its values).
    """
    dtype = _torch_dtype(wire_dtype)
    not_float = sorted(name for name, t in state.items() if not t.is_floating_point())
    if not_float:
        raise ValueError(f"tensors {not_float} are not floating point; only float prompt state can be sent")
    wire = {
        name: t.detach().to("cpu", dtype, copy=True, memory_format=torch.contiguous_format)
        for name, t in state.items()
    }
    return _sorted_metadata(save(wire, metadata=dict(metadata) if metadata is not None else None))


def _sorted_metadata(data: bytes) -> bytes:
    """Rewrite the header with its metadata keys sorted.

    safetensors writes the metadata in hash-map order, which differs from call to call; the
    tensor entries and data are already in a fixed order.
    """
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes so the data stays aligned
    return len(text).to_bytes(8, "little") + text + data[8 + header_len :]


def decode_state(data: bytes, spec: PayloadSpec) -> tuple[State, dict[str, str]]:
    """Validate safetensors bytes against ``spec``; return fp32 CPU tensors and the header metadata.

    Raises PayloadError when the payload is over the size limit, is not safetensors, lacks a tensor
    or has an extra one, or holds a tensor of the wrong shape or dtype or with NaN/Inf values.
    """
    if len(data) > spec.max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes, over the limit of {spec.max_bytes} bytes")
    try:
        views = dict(deserialize(data))
    except SafetensorError as exc:
        raise PayloadError(f"payload is not valid safetensors: {exc}") from None
    header = _parse_header(data)

    missing = sorted(set(spec.shapes) - set(views))
    unexpected = sorted(set(views) - set(spec.shapes))
    if missing or unexpected:
        raise PayloadError(f"payload tensor names do not match: missing {missing}, unexpected {unexpected}")

    expected_code = _SAFETENSORS_DTYPES[spec.wire_dtype]
    problems = []
    for name, shape in spec.shapes.items():
        got_shape, got_code = tuple(views[name]["shape"]), views[name]["dtype"]
        if got_shape != shape:
            problems.append(f"tensor {name!r} has shape {got_shape}, expected {shape}")
        if got_code != expected_code:
            got = _DTYPE_NAMES.get(got_code, got_code)
            problems.append(f"tensor {name!r} has dtype {got}, expected {spec.wire_dtype}")
    if problems:
        raise PayloadError("; ".join(problems))

    dtype = WIRE_DTYPES[spec.wire_dtype]
    state: State = {}
    for name, shape in spec.shapes.items():
        buffer = views[name]["data"]  # a fresh bytearray; safetensors and torch are both little-endian
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensor = flat.reshape(shape).to(torch.float32)
        non_finite = int((~torch.isfinite(tensor)).sum())
        if non_finite:
            raise PayloadError(
                f"tensor {name!r} has {non_finite} non-finite (NaN or Inf) values of {tensor.numel()}"
            )
        state[name] = tensor
    return state, dict(header.get("__metadata__", {}))


def _parse_header(data: bytes) -> dict[str, Any]:
    """The JSON header of bytes safetensors already accepted, refusing keys that appear twice.

    safetensors keeps the last of duplicate keys; refusing them means no reader can see a
    different payload than the one validated here.
    """
    header_len = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8 : 8 + header_len], object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise PayloadError(f"payload header is not valid: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears more than once")
        out[key] = value
    return out


# --------------------------------------------------------------------------- updates


def encode_update(update: Update, wire_dtype: str) -> bytes:
    """Serialise a client update: its state plus client id, example count and metrics as metadata.

    Raises ValueError when the update could not pass ``decode_update`` (a negative client id, a
    non-positive example count, a non-finite metric), so the sender finds its own bug.
    """
    if isinstance(update.client_id, bool) or not isinstance(update.client_id, int) or update.client_id < 0:
        raise ValueError(f"client_id must be a non-negative integer, got {update.client_id!r}")
    if (
        isinstance(update.num_examples, bool)
        or not isinstance(update.num_examples, int)
        or update.num_examples < 1
    ):
        raise ValueError(f"num_examples must be a positive integer, got {update.num_examples!r}")
    metrics = {name: float(value) for name, value in update.metrics.items()}
    non_finite = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if non_finite:
        raise ValueError(f"metrics {non_finite} are not finite")
    text = json.dumps(metrics, sort_keys=True, allow_nan=False)
    try:
        _check_metric_limits(metrics, len(text.encode()))
    except PayloadError as exc:
        raise ValueError(str(exc)) from None
    metadata = {
        CLIENT_ID_KEY: str(update.client_id),
        NUM_EXAMPLES_KEY: str(update.num_examples),
        METRICS_KEY: text,
    }
    return encode_state(pack(update.state, update.extras), wire_dtype, metadata)


def decode_update(data: bytes, spec: PayloadSpec, expected_client_id: int | None = None) -> Update:
    """Validate an update's bytes (the state as ``decode_state`` does, then its metadata) and rebuild it.

    Raises PayloadError naming the field when a metadata key is missing or unexpected, the client id
    differs from ``expected_client_id`` (when given), the example count is not a positive integer,
    or the metrics are not a JSON object of finite numbers.
    """
    tensors, metadata = decode_state(data, spec)
    state, extras = unpack(tensors)
    missing = [key for key in UPDATE_METADATA_KEYS if key not in metadata]
    unexpected = sorted(set(metadata) - set(UPDATE_METADATA_KEYS))
    if missing or unexpected:
        raise PayloadError(f"update metadata does not match: missing {missing}, unexpected {unexpected}")

    client_id = _metadata_integer(metadata, CLIENT_ID_KEY)
    if expected_client_id is not None and client_id != expected_client_id:
        raise PayloadError(f"{CLIENT_ID_KEY} is {client_id}, expected {expected_client_id}")
    num_examples = _metadata_integer(metadata, NUM_EXAMPLES_KEY)
    if num_examples < 1:
        raise PayloadError(f"{NUM_EXAMPLES_KEY} must be a positive integer, got {num_examples}")
    return Update(client_id, state, num_examples, parse_metrics(metadata[METRICS_KEY]), extras)


def _metadata_integer(metadata: Mapping[str, str], key: str) -> int:
    value = metadata[key]
    if not _INTEGER.fullmatch(value):
        raise PayloadError(f"{key} must be a non-negative integer of at most 20 digits, got {value[:40]!r}")
    return int(value)


def _check_metric_limits(metrics: Mapping[str, Any], size: int) -> None:
    if size > MAX_METRICS_BYTES:
        raise PayloadError(f"{METRICS_KEY} is {size} bytes, over the limit of {MAX_METRICS_BYTES}")
    if len(metrics) > MAX_METRICS:
        raise PayloadError(f"{METRICS_KEY} holds {len(metrics)} metrics, over the limit of {MAX_METRICS}")
    bad = sorted(name for name in metrics if not METRIC_NAME.fullmatch(name))[:5]
    if bad:
        raise PayloadError(
            f"{METRICS_KEY} names {[name[:70] for name in bad]} are not lower-case names of at most 64 "
            "characters (letters, digits, '_', '.')"
        )


def parse_metrics(text: str) -> dict[str, float]:
    """A client's metrics from their JSON text (an update's metadata), within the metric limits;
    PayloadError names what is wrong."""
    size = len(text.encode())
    if size > MAX_METRICS_BYTES:  # before parsing: never parse an oversized text
        raise PayloadError(f"{METRICS_KEY} is {size} bytes, over the limit of {MAX_METRICS_BYTES}")
    try:
        # parse_int=float: every number is a float, and a huge integer becomes inf (rejected below).
        metrics = json.loads(text, parse_int=float, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{METRICS_KEY} is not valid JSON: {exc}") from None
    if not isinstance(metrics, dict):
        raise PayloadError(f"{METRICS_KEY} must be a JSON object, got {text[:40]!r}")
    _check_metric_limits(metrics, len(text.encode()))
    bad = sorted(
        name for name, value in metrics.items() if not isinstance(value, float) or not math.isfinite(value)
    )
    if bad:
        raise PayloadError(f"{METRICS_KEY} values must be finite numbers; these are not: {bad}")
    return metrics


# --------------------------------------------------------------------------- byte accounting


class ByteCounter:
    """Owns the count of payload bytes per round, client and direction.

    "up" is client -> server, "down" is server -> client. Recording the same round, client and
    direction twice adds the bytes.
    """

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, int, Direction], int] = {}

    def record(self, round: int, client_id: int, direction: Direction, nbytes: int) -> None:
        """Count ``nbytes`` sent in ``direction`` between the server and ``client_id`` in ``round``."""
        _check_direction(direction)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
        key = (round, client_id, direction)
        self._bytes[key] = self._bytes.get(key, 0) + nbytes

    def total(self, direction: Direction, round: int | None = None) -> int:
        """Bytes sent in ``direction``, in ``round`` or (None) over all rounds."""
        _check_direction(direction)
        return sum(
            n for (r, _, d), n in self._bytes.items() if d == direction and (round is None or r == round)
        )

    def per_client(self, round: int) -> dict[int, dict[str, int]]:
        """Client id -> {"up": bytes, "down": bytes} for the clients that exchanged bytes in ``round``."""
        out: dict[int, dict[str, int]] = {}
        for (r, client_id, direction), n in sorted(self._bytes.items()):
            if r == round:
                out.setdefault(client_id, dict.fromkeys(DIRECTIONS, 0))[direction] += n
        return out


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
