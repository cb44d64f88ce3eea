"""The wire format: round trips, determinism, byte sizes, every rejection path, byte accounting."""

from __future__ import annotations

import json

import pytest
import torch

from fedprompt.errors import PayloadError
from fedprompt.federation.payload import (
    CLIENT_ID_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    WIRE_DTYPES,
    ByteCounter,
    PayloadSpec,
    decode_state,
    decode_update,
    encode_state,
    encode_update,
)
from fedprompt.federation.state import State, Update

MAX_BYTES = 1 << 20


def make_state(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt.embeddings": torch.randn(8, 384, generator=g),  # 3072 numbers
        "prompt.deep.3": torch.randn(4, 16, generator=g),
        "scale": torch.randn(1, generator=g),
    }


def spec_for(state: State, wire_dtype: str = "float32", max_bytes: int = MAX_BYTES) -> PayloadSpec:
    return PayloadSpec.for_state(state, wire_dtype, max_bytes)


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def raw_payload(header: str, body: bytes) -> bytes:
    """Hand-built safetensors bytes, for headers that safetensors.save would never write."""
    text = header.encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def update_bytes(metadata: dict[str, str], state: State | None = None) -> bytes:
    return encode_state(state if state is not None else make_state(), "float32", metadata)


GOOD_METADATA = {CLIENT_ID_KEY: "3", NUM_EXAMPLES_KEY: "12", METRICS_KEY: '{"loss": 0.5}'}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_state_round_trip_equals_the_cast_values(wire_dtype: str) -> None:
    state = make_state()
    data = encode_state(state, wire_dtype, {"round": "2"})
    decoded, metadata = decode_state(data, spec_for(state, wire_dtype))

    assert metadata == {"round": "2"}
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == torch.float32
        assert decoded[name].device.type == "cpu"
        expected = tensor.to(WIRE_DTYPES[wire_dtype]).to(torch.float32)
        assert torch.equal(decoded[name], expected)
    if wire_dtype == "float32":
        assert all(torch.equal(decoded[name], state[name]) for name in state)


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_payload_size_is_tensor_bytes_plus_header(wire_dtype: str) -> None:
    state = make_state()
    data = encode_state(state, wire_dtype)
    itemsize = torch.empty(0, dtype=WIRE_DTYPES[wire_dtype]).element_size()
    tensor_bytes = sum(t.numel() for t in state.values()) * itemsize
    assert len(data) == 8 + header_length(data) + tensor_bytes


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_half_precision_payload_is_about_half_of_fp32(wire_dtype: str) -> None:
    state = make_state()
    full, half = encode_state(state, "float32"), encode_state(state, wire_dtype)
    assert len(half) < 0.55 * len(full)


def test_encoding_is_deterministic() -> None:
    metadata = {f"key{i}": str(i) for i in range(16)}
    payloads = {encode_state(make_state(), "bfloat16", metadata) for _ in range(10)}
    assert len(payloads) == 1
    # The order the metadata was given in does not matter either.
    assert encode_state(make_state(), "bfloat16", dict(reversed(metadata.items()))) in payloads
    assert encode_state(make_state(seed=1), "bfloat16", metadata) not in payloads


def test_encode_accepts_non_contiguous_grad_tensors_and_leaves_them_alone() -> None:
    base = torch.randn(6, 4, requires_grad=True)
    state = {"t": base.t(), "alias": base.t()}  # non-contiguous views sharing one storage
    decoded, _ = decode_state(encode_state(state, "float32"), spec_for(state))
    assert torch.equal(decoded["t"], base.detach().t())
    assert torch.equal(decoded["alias"], base.detach().t())
    assert base.requires_grad


def test_encode_rejects_non_float_tensors_and_unknown_wire_dtype() -> None:
    with pytest.raises(ValueError, match=r"\['seed'\] are not floating point"):
        encode_state({"z": torch.zeros(3), "seed": torch.tensor(7)}, "float32")
    with pytest.raises(ValueError, match="wire_dtype 'int8' is unknown"):
        encode_state(make_state(), "int8")


def test_empty_tensor_round_trips() -> None:
    state = {"empty": torch.zeros(0, 4), "x": torch.ones(2)}
    decoded, _ = decode_state(encode_state(state, "float16"), spec_for(state, "float16"))
    assert decoded["empty"].shape == (0, 4)
    assert torch.equal(decoded["x"], torch.ones(2))


def test_update_round_trip() -> None:
    state = make_state()
    update = Update(client_id=7, state=state, num_examples=42, metrics={"loss": 0.25, "accuracy": 1})
    decoded = decode_update(
        encode_update(update, "bfloat16"), spec_for(state, "bfloat16"), expected_client_id=7
    )
    assert decoded.client_id == 7
    assert decoded.num_examples == 42
    assert decoded.metrics == {"loss": 0.25, "accuracy": 1.0}
    assert all(isinstance(v, float) for v in decoded.metrics.values())
    for name, tensor in state.items():
        assert torch.equal(decoded.state[name], tensor.to(torch.bfloat16).float())


# --------------------------------------------------------------------------- spec


def test_spec_for_state_and_its_checks() -> None:
    spec = spec_for(make_state(), "float16", 4096)
    assert dict(spec.shapes) == {"prompt.embeddings": (8, 384), "prompt.deep.3": (4, 16), "scale": (1,)}
    assert spec.wire_dtype == "float16" and spec.max_bytes == 4096
    with pytest.raises(TypeError):
        spec.shapes["new"] = (1,)  # type: ignore[index]
    with pytest.raises(ValueError, match="wire_dtype 'float64' is unknown"):
        PayloadSpec({}, "float64", 1024)
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        PayloadSpec({}, "float32", 0)


# --------------------------------------------------------------------------- state rejections


def test_oversize_payload_is_rejected_before_parsing() -> None:
    state = make_state()
    data = encode_state(state, "float32")
    limit = len(data) - 1
    with pytest.raises(PayloadError, match=rf"payload is {len(data)} bytes, over the limit of {limit} bytes"):
        decode_state(data, spec_for(state, max_bytes=limit))
    # The check comes before parsing: oversize garbage is reported as oversize.
    with pytest.raises(PayloadError, match="over the limit"):
        decode_state(b"\xff" * (limit + 1), spec_for(state, max_bytes=limit))
    assert decode_state(data, spec_for(state, max_bytes=len(data)))[0].keys() == state.keys()


@pytest.mark.parametrize("data", [b"", b"garbage", b"\xff" * 64, b"\x08" + b"\x00" * 7 + b"not json"])
def test_garbage_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(PayloadError, match="not valid safetensors"):
        decode_state(data, spec_for(make_state()))


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_bytes_are_rejected(cut: int) -> None:
    state = make_state()
    data = encode_state(state, "float32")
    with pytest.raises(PayloadError, match="not valid safetensors"):
        decode_state(data[:-cut], spec_for(state))


def test_duplicate_header_keys_are_rejected() -> None:
    entry = '"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    data = raw_payload("{" + entry + "," + entry + "}", b"\x00" * 4)
    with pytest.raises(PayloadError, match="'x' appears more than once"):
        decode_state(data, spec_for({"x": torch.zeros(1)}))


def test_missing_and_unexpected_tensors_are_listed() -> None:
    state = make_state()
    sent = {"scale": state["scale"], "extra": torch.zeros(2), "other": torch.zeros(1)}
    with pytest.raises(
        PayloadError,
        match=r"missing \['prompt.deep.3', 'prompt.embeddings'\], unexpected \['extra', 'other'\]",
    ):
        decode_state(encode_state(sent, "float32"), spec_for(state))


def test_missing_tensor_alone() -> None:
    state = make_state()
    sent = {k: v for k, v in state.items() if k != "scale"}
    with pytest.raises(PayloadError, match=r"missing \['scale'\], unexpected \[\]"):
        decode_state(encode_state(sent, "float32"), spec_for(state))


def test_wrong_shape_is_rejected() -> None:
    state = make_state()
    sent = {**state, "prompt.deep.3": torch.zeros(16, 4)}
    with pytest.raises(PayloadError, match=r"tensor 'prompt.deep.3' has shape \(16, 4\), expected \(4, 16\)"):
        decode_state(encode_state(sent, "float32"), spec_for(state))


@pytest.mark.parametrize(("sent", "expected"), [("float32", "float16"), ("bfloat16", "float16")])
def test_wrong_dtype_is_rejected(sent: str, expected: str) -> None:
    state = make_state()
    with pytest.raises(PayloadError, match=rf"tensor 'scale' has dtype {sent}, expected {expected}"):
        decode_state(encode_state(state, sent), spec_for(state, expected))


def test_foreign_dtype_is_rejected() -> None:
    data = raw_payload('{"x":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', b"\x00" * 4)
    with pytest.raises(PayloadError, match="tensor 'x' has dtype I32, expected float32"):
        decode_state(data, spec_for({"x": torch.zeros(1)}))


@pytest.mark.parametrize(("bad", "wire_dtype"), [(float("nan"), "float32"), (float("nan"), "bfloat16")])
def test_nan_is_rejected(bad: float, wire_dtype: str) -> None:
    state = make_state()
    poisoned = {**state, "prompt.deep.3": state["prompt.deep.3"].clone()}
    poisoned["prompt.deep.3"][0, :3] = bad
    with pytest.raises(
        PayloadError, match=r"tensor 'prompt.deep.3' has 3 non-finite \(NaN or Inf\) values of 64"
    ):
        decode_state(encode_state(poisoned, wire_dtype), spec_for(state, wire_dtype))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), 1e6])  # 1e6 overflows float16 to inf
def test_inf_is_rejected(bad: float) -> None:
    state = make_state()
    poisoned = {**state, "scale": torch.tensor([bad])}
    with pytest.raises(PayloadError, match=r"tensor 'scale' has 1 non-finite \(NaN or Inf\) values of 1"):
        decode_state(encode_state(poisoned, "float16"), spec_for(state, "float16"))


# --------------------------------------------------------------------------- update rejections


def test_good_update_metadata_is_accepted() -> None:
    update = decode_update(update_bytes(GOOD_METADATA), spec_for(make_state()), expected_client_id=3)
    assert (update.client_id, update.num_examples, update.metrics) == (3, 12, {"loss": 0.5})


NOT_A_COUNT = r"fedprompt\.num_examples must be a non-negative integer"
LOSS_NOT_FINITE = r"fedprompt\.metrics values must be finite numbers; these are not: \['loss'\]"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (NUM_EXAMPLES_KEY, None, r"missing \['fedprompt\.num_examples'\], unexpected \[\]"),
        (CLIENT_ID_KEY, None, r"missing \['fedprompt\.client_id'\]"),
        ("fedprompt.round", "1", r"missing \[\], unexpected \['fedprompt\.round'\]"),
        (NUM_EXAMPLES_KEY, "0", r"fedprompt\.num_examples must be a positive integer, got 0"),
        (NUM_EXAMPLES_KEY, "-5", NOT_A_COUNT),
        (NUM_EXAMPLES_KEY, "12.5", NOT_A_COUNT),
        (NUM_EXAMPLES_KEY, "ten", NOT_A_COUNT),
        (NUM_EXAMPLES_KEY, "9" * 5000, NOT_A_COUNT),
        (CLIENT_ID_KEY, "x", r"fedprompt\.client_id must be a non-negative integer"),
        (METRICS_KEY, '{"loss": NaN}', LOSS_NOT_FINITE),
        (METRICS_KEY, '{"loss": -Infinity}', LOSS_NOT_FINITE),
        (METRICS_KEY, '{"loss": 1e999}', LOSS_NOT_FINITE),
        (METRICS_KEY, '{"loss": ' + "9" * 400 + "}", LOSS_NOT_FINITE),
        (METRICS_KEY, '{"loss": true}', LOSS_NOT_FINITE),
        (METRICS_KEY, '{"loss": "0.5"}', LOSS_NOT_FINITE),
        (METRICS_KEY, "[0.5]", r"fedprompt\.metrics must be a JSON object"),
        (METRICS_KEY, "0.5", r"fedprompt\.metrics must be a JSON object"),
        (METRICS_KEY, "{loss: 0.5}", r"fedprompt\.metrics is not valid JSON"),
        (
            METRICS_KEY,
            '{"a": 1, "a": 2}',
            r"fedprompt\.metrics is not valid JSON: key 'a' appears more than once",
        ),
        (METRICS_KEY, "[" * 5_000, r"fedprompt\.metrics is not valid JSON"),
        (METRICS_KEY, "[" * 100_000, r"fedprompt\.metrics is 100000 bytes, over the limit of 8192"),
    ],
)
def test_bad_update_metadata_is_rejected(key: str, value: str | None, match: str) -> None:
    metadata = {k: v for k, v in GOOD_METADATA.items() if k != key}
    if value is not None:
        metadata[key] = value
    with pytest.raises(PayloadError, match=match):
        decode_update(update_bytes(metadata), spec_for(make_state()))


def test_client_id_mismatch_is_rejected() -> None:
    with pytest.raises(PayloadError, match=r"fedprompt\.client_id is 3, expected 4"):
        decode_update(update_bytes(GOOD_METADATA), spec_for(make_state()), expected_client_id=4)


def test_update_state_is_validated_too() -> None:
    state = make_state()
    update = Update(client_id=1, state={**state, "scale": torch.zeros(2)}, num_examples=1)
    with pytest.raises(PayloadError, match="tensor 'scale' has shape"):
        decode_update(encode_update(update, "float32"), spec_for(state))


@pytest.mark.parametrize(
    ("update", "match"),
    [
        (Update(client_id=-1, state={}, num_examples=1), "client_id must be a non-negative integer"),
        (Update(client_id=0, state={}, num_examples=0), "num_examples must be a positive integer"),
        (Update(client_id=0, state={}, num_examples=True), "num_examples must be a positive integer"),
        (Update(client_id=0, state={}, num_examples=1, metrics={"a": float("nan")}), r"\['a'\] are not"),
    ],
)
def test_encode_update_refuses_what_decode_would_reject(update: Update, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_update(update, "float32")


def test_update_metrics_are_sorted_json() -> None:
    update = Update(client_id=0, state={"x": torch.ones(1)}, num_examples=1, metrics={"b": 2, "a": 1.5})
    data = encode_update(update, "float32")
    header = json.loads(data[8 : 8 + header_length(data)])
    assert header["__metadata__"][METRICS_KEY] == '{"a": 1.5, "b": 2.0}'


# --------------------------------------------------------------------------- byte counter


def test_byte_counter_arithmetic() -> None:
    counter = ByteCounter()
    counter.record(0, 1, "down", 100)
    counter.record(0, 1, "up", 60)
    counter.record(0, 2, "down", 100)
    counter.record(1, 1, "down", 100)
    counter.record(1, 1, "up", 50)
    counter.record(1, 1, "up", 5)  # a resend in the same round adds up
    counter.record(1, 3, "up", 0)

    assert counter.total("down") == 300
    assert counter.total("up") == 115
    assert counter.total("down", round=0) == 200
    assert counter.total("up", round=1) == 55
    assert counter.total("up", round=7) == 0
    assert counter.per_client(0) == {1: {"up": 60, "down": 100}, 2: {"up": 0, "down": 100}}
    assert counter.per_client(1) == {1: {"up": 55, "down": 100}, 3: {"up": 0, "down": 0}}
    assert counter.per_client(2) == {}
    # per_client hands out copies: editing them does not change the counts.
    counter.per_client(0)[1]["up"] = 0
    assert counter.total("up", round=0) == 60


def test_byte_counter_counts_real_payloads() -> None:
    counter = ByteCounter()
    state = make_state()
    down = encode_state(state, "float16")
    up = encode_update(Update(client_id=4, state=state, num_examples=3), "float16")
    counter.record(0, 4, "down", len(down))
    counter.record(0, 4, "up", len(up))
    assert counter.per_client(0) == {4: {"up": len(up), "down": len(down)}}


def test_byte_counter_rejects_bad_records() -> None:
    counter = ByteCounter()
    with pytest.raises(ValueError, match="direction must be one of"):
        counter.record(0, 1, "sideways", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nbytes must be a non-negative integer"):
        counter.record(0, 1, "up", -1)
    with pytest.raises(ValueError, match="direction must be one of"):
        counter.total("both")  # type: ignore[arg-type]
    assert counter.total("up") == 0
