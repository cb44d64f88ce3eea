"""The JSON wire format between a remote-backbone client and ``fedprompt serve``.

Plain JSON arrays, validated field by field (finite numbers within float32's range, integer ids,
exact keys); never pickle. A request carries candidate vectors z with the projection spec that
turns them into prompts, the head spec, and inputs as token ids: the tokenizer is public and runs
on the client (each input is tokenised once per run, not per query), and the service checks every
id against its vocabulary and every length against its ``max_length``. Responses carry logits or losses
and the queries the request cost; nothing that holds a weight or a gradient.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from prompt_modules.heads import HeadSpec
from prompt_modules.intrinsic import ProjectionSpec

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: a larger magnitude would become infinite on the service."""


def _fits_float32(value: float) -> float:
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value!r} overflows float32 (the largest magnitude is {FLOAT32_MAX:.8g})")
    return value


WireFloat = Annotated[float, Field(strict=True, allow_inf_nan=False), AfterValidator(_fits_float32)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogitsRequest(_Wire):
    """Score inputs under candidate intrinsic prompts: z [P][d], input_ids [B][≤ max_length]."""

    projection: ProjectionSpec
    head: HeadSpec
    z: list[list[WireFloat]] = Field(min_length=1, description="Candidate vectors, one row each.")
    input_ids: list[list[TokenId]] = Field(
        min_length=1, description="Token ids of each input (template and special tokens applied, unpadded)."
    )


class LossRequest(LogitsRequest):
    """As ``LogitsRequest`` plus the inputs' labels: the answer is one mean cross-entropy per candidate."""

    labels: list[TokenId] = Field(min_length=1, description="Class index of each input.")


class LogitsResponse(_Wire):
    """Class logits [P][B][C] and the queries (P·B) the request cost."""

    logits: list[list[list[float]]]
    queries: int


class LossResponse(_Wire):
    """Mean cross-entropy of each candidate [P] and the queries (P·B) the request cost."""

    losses: list[float]
    queries: int


class ServiceInfo(_Wire):
    """What a client needs to talk to the service: the model's public facts and the request limits."""

    model: str
    hidden_size: int
    vocab_size: int
    max_length: int
    is_decoder: bool
    has_lm_head: bool
    tokenizer_sha256: str
    backbone_bytes: int
    max_candidates: int
    max_examples: int
    max_queries: int
    max_request_bytes: int
    max_projection_floats: int | None = None


class Usage(_Wire):
    """One client's counters since the service started (requests and queries computed; the bytes of
    the bodies of its answered POSTs, received and sent; the floats of projections drawn for it),
    and its query quota (None: no quota)."""

    client: str
    requests: int
    queries: int
    candidates: int
    examples: int
    bytes_received: int = 0
    bytes_sent: int = 0
    query_quota: int | None = None
    projection_floats: int = 0
    """Floats of the projections the service drew for this client (counted against its quota)."""
